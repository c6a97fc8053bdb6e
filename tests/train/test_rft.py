"""`python -m sailor_engine.train` in RFT mode on a tiny synthesized world.

Single process: the loss falls, metrics / checkpoints / HF export are written, a run resumed from
its newest complete checkpoint writes the same metrics as the uninterrupted run, and a run started
from the HF export (or the checkpoint) begins at the loss a plain full-logits computation gives.
Under torchrun (gloo): tp=2, dp=2 (DDP and FSDP2), pp=2 and pp=2 x dp=2 (FSDP2, 4 processes) reproduce
the single-process run's per-step losses and gradient norms (fp32, <= 1e-5 relative; measured ~2e-7)
and its final weights; FSDP2 and pp=2 also resumed from the single-process run's checkpoint, tp=2
also from the HF export; an impossible layout exits non-zero with ParallelDims' message.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch

from sailor_engine.model import Tokenizer, load_hf
from sailor_engine.rollout.format import ChatTemplate
from sailor_engine.synth.expert import Trajectory
from sailor_engine.synth.pipeline import read_jsonl, synthesize, write_world
from sailor_engine.train.__main__ import main
from sailor_engine.train.batching import Sequence
from sailor_engine.train.rft import batch_indices, deal, micro_batches
from tests.train.tiny import MODEL_YAML, SYNTH

CONFIG = MODEL_YAML + """\
train:
  data_dir: DATA
  micro_batch_tokens: 2048
  checkpoint_every: 2
  keep_last: 2
  rft: {batch_size: 6, epochs: 3, lr: 1.0e-2, warmup_steps: 2, min_lr_ratio: 0.1}
"""
STEPS = 9  # 21 trajectories // 6 per step = 3 steps per epoch, 3 epochs


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rft")
    w = synthesize(SYNTH)
    assert len(w.experts) == 21 and w.tokenizer.get_vocab_size() == 384, (len(w.experts), w.tokenizer.get_vocab_size())
    write_world(w, root / "data")
    (root / "run.yaml").write_text(CONFIG.replace("DATA", str(root / "data")))
    return root


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def same_run(rows: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["tokens"], r["loss_tokens"]) for r in rows]


@pytest.fixture(scope="module")
def single(world) -> Path:
    out = world / "single"
    assert main(["--config", str(world / "run.yaml"), "--set", f"train.out_dir={out}"]) == 0
    return out


def test_single_process_learns_and_writes_its_outputs(single):
    rows = metrics(single)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert losses[-1] < 0.8 * losses[0], losses
    assert rows[0]["lr"] == pytest.approx(5e-3) and rows[1]["lr"] == pytest.approx(1e-2)
    assert all(r["tokens"] > r["loss_tokens"] > 0 and r["grad_norm"] > 0 for r in rows)
    kept = sorted(p.name for p in (single / "checkpoints").iterdir())
    assert kept == ["step-00000008", "step-00000009"]  # keep_last 2 (every 2 steps, and the end)
    model = load_hf(single / "hf")
    assert model.cfg.vocab_size == 384 and model.cfg.hidden_size == 32


def test_resume_continues_as_the_uninterrupted_run(world, single):
    out = world / "resumed"
    assert main(["--config", str(world / "run.yaml"), "--set", f"train.out_dir={out}", "--set", "train.keep_last=9"]) == 0
    # As if killed while writing step 8's checkpoint: step 6 is the newest complete one, and
    # metrics.jsonl already holds steps 7 and 8 (the resumed run must not write them twice).
    shutil.rmtree(out / "checkpoints" / "step-00000009")
    (out / "checkpoints" / "step-00000008" / "manifest.json").unlink()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics(out)[:8]))
    assert main(["--config", str(world / "run.yaml"), "--set", f"train.out_dir={out}"]) == 0
    assert same_run(metrics(out)) == same_run(metrics(single))  # exact: CPU fp32 is deterministic


def test_data_order_and_shares():
    assert batch_indices(4, 21, 6, 0) == batch_indices(4, 21, 6, 0) != batch_indices(1, 21, 6, 0)
    epoch = [i for s in range(3) for i in batch_indices(s, 21, 6, 0)]
    assert len(set(epoch)) == 18  # one epoch: distinct trajectories
    seqs = [Sequence([1] * n, [1] * n) for n in (9, 3, 7, 5, 2)]
    shares = deal(seqs, 2)
    assert [[len(s.token_ids) for s in r] for r in shares] == [[9, 3, 2], [7, 5]]  # 11 and 10 positions
    # in micro-batches of <= 10 positions rank 0 needs two, rank 1 one: rank 1 gets a zero-loss pad
    assert [[len(s.token_ids) for s in mb] for mb in micro_batches(shares, 10, 0)] == [[9, 3], [2]]
    mine = micro_batches(shares, 10, 1)
    assert len(mine) == 2 and mine[1][0].loss_mask == [0, 0] and len(mine[1][0].token_ids) == 2
    # pipeline stages want >= 3 in flight: the largest micro-batch is halved while it holds several
    assert [[len(s.token_ids) for s in mb] for mb in micro_batches(shares, 100, 0, at_least=3)] == [[9], [3], [2]]
    assert [[len(s.token_ids) for s in mb] for mb in micro_batches(shares, 100, 1, at_least=3)] == [[7], [5], [2]]


def test_config_errors_exit_2(world, capsys):
    assert main(["--config", str(world / "run.yaml"), "--set", f"train.data_dir={world}/nowhere"]) == 2
    assert "train.data_dir" in capsys.readouterr().err
    assert main(["--config", str(world / "run.yaml"), "--set", "train.rft.batch_size=22",
                 "--set", f"train.out_dir={world}/big"]) == 2
    assert "train.rft.batch_size (22) is larger than the 21 expert trajectories" in capsys.readouterr().err


def torchrun(world: Path, out: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", "-m",
           "sailor_engine.train", "--config", str(world / "run.yaml"), "--set", f"train.out_dir={out}"]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.dist
@pytest.mark.parametrize("layout", [("parallel.tp=2",), ("parallel.data_parallel=ddp",),
                                    ("parallel.data_parallel=fsdp",), ("parallel.pp=2",),
                                    ("parallel.pp=2", "parallel.dp=2")],
                         ids=["tp2", "dp2-ddp", "dp2-fsdp", "pp2", "pp2-dp2-fsdp-4procs"])
def test_several_processes_match_the_single_process_run(world, single, layout):
    out = world / f"dist-{'-'.join(layout)}"
    proc = torchrun(world, out, *layout, nproc=4 if "parallel.dp=2" in layout else 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got, ref = metrics(out), metrics(single)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for g, r in zip(got, ref):
        for key in ("loss", "grad_norm"):
            assert abs(g[key] - r[key]) <= 1e-5 * abs(r[key]), (key, g, r)
        assert (g["tokens"], g["loss_tokens"], g["lr"]) == (r["tokens"], r["loss_tokens"], r["lr"])
    worst = max(abs(g["loss"] - r["loss"]) / r["loss"] for g, r in zip(got, ref))
    print(f"{' '.join(layout)}: max relative loss difference {worst:.1e}")
    full, theirs = load_hf(single / "hf"), load_hf(out / "hf")
    for (name, a), (_, b) in zip(full.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


@torch.no_grad()
def reference_first_loss(world: Path, hf: Path) -> float:
    """Step 1's loss restated plainly: full logits, log_softmax, mean over the policy tokens of the batch."""
    model = load_hf(hf)
    tpl = ChatTemplate(Tokenizer.from_file(world / "data" / "tokenizer.json"))
    experts = read_jsonl(world / "data" / "experts.jsonl", Trajectory)
    total, count = 0.0, 0
    for i in batch_indices(0, len(experts), 6, 0):
        ids, mask = tpl.render_messages([msgspec.to_builtins(m) for m in experts[i].messages])
        logits = model(torch.tensor([ids[:-1]]))[0].double()
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        total -= float((logp * torch.tensor(mask[1:])).sum())
        count += sum(mask[1:])
    return total / count


@pytest.fixture(scope="module")
def from_hf(world, single) -> Path:
    out = world / "from-hf"
    assert main(["--config", str(world / "run.yaml"), "--set", f"train.out_dir={out}",
                 "--set", f"train.init_from={single / 'hf'}", "--set", "train.rft.max_steps=3"]) == 0
    return out


def test_init_from_an_hf_export_or_a_checkpoint(world, single, from_hf):
    first = metrics(from_hf)[0]["loss"]
    assert first == pytest.approx(reference_first_loss(world, single / "hf"), rel=1e-5)
    assert first < 0.9 * metrics(single)[0]["loss"]  # it starts where the single run ended, not from scratch
    out = world / "from-ckpt"
    assert main(["--config", str(world / "run.yaml"), "--set", f"train.out_dir={out}", "--set", "train.rft.max_steps=3",
                 "--set", f"train.init_from={single / 'checkpoints' / 'step-00000009'}"]) == 0
    assert same_run(metrics(out)) == same_run(metrics(from_hf))


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["parallel.data_parallel=fsdp", "parallel.pp=2"], ids=["dp2-fsdp", "pp2"])
def test_resumes_from_a_single_process_checkpoint(world, single, layout):
    out = world / f"resumed-{layout}"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(single / "checkpoints" / "step-00000008", out / "checkpoints" / "step-00000008")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics(single)[:8]))
    proc = torchrun(world, out, layout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got, ref = metrics(out), metrics(single)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)) and got[:8] == ref[:8]
    for key in ("loss", "grad_norm"):
        assert abs(got[8][key] - ref[8][key]) <= 1e-5 * ref[8][key], (key, got[8], ref[8])


@pytest.mark.dist
def test_tp2_from_an_hf_export_matches_the_single_process_run(world, single, from_hf):
    out = world / "tp2-from-hf"
    proc = torchrun(world, out, "parallel.tp=2", f"train.init_from={single / 'hf'}", "train.rft.max_steps=3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for g, r in zip(metrics(out), metrics(from_hf), strict=True):
        assert abs(g["loss"] - r["loss"]) <= 1e-5 * r["loss"] and abs(g["grad_norm"] - r["grad_norm"]) <= 1e-5 * r["grad_norm"]


@pytest.mark.dist
def test_impossible_layout_exits_with_the_parallel_dims_message(world):
    proc = torchrun(world, world / "bad", "parallel.tp=3", "model.num_heads=6", "model.num_kv_heads=6",
                    "model.hidden_size=48")
    assert proc.returncode != 0
    assert "world size 2 is not divisible by parallel.tp * parallel.pp = 3 * 1 = 3" in proc.stderr, proc.stderr[-3000:]


def test_plots_and_tensorboard_are_wired(single, world, monkeypatch):
    pngs = sorted(p.name for p in (single / "plots").glob("*.png"))
    assert "loss.png" in pngs  # train.plots defaults to on
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sailor_engine.train import plots, rft

    out = world / "tb"
    assert main(["--config", str(world / "run.yaml"), "--set", f"train.out_dir={out}", "--set", "train.rft.max_steps=3",
                 "--set", "train.tensorboard=true"]) == 0
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert [r["step"] for r in rows] == [1, 2, 3]

    # asked for and missing: exit 2 naming the field, before any compute
    monkeypatch.setattr(rft, "HAS_TENSORBOARD", False)
    monkeypatch.setattr(plots, "HAS_TENSORBOARD", False)
    out = world / "tb_missing"
    assert main(["--config", str(world / "run.yaml"), "--set", f"train.out_dir={out}",
                 "--set", "train.tensorboard=true"]) == 2
    assert not (out / "metrics.jsonl").exists()


def test_resume_false_refuses_an_out_dir_with_checkpoints(world, single, capsys):
    before = sorted(p.name for p in (single / "checkpoints").iterdir())
    assert main(["--config", str(world / "run.yaml"), "--set", f"train.out_dir={single}",
                 "--set", "train.resume=false"]) == 2
    assert "train.resume = false, but train.out_dir" in capsys.readouterr().err
    assert sorted(p.name for p in (single / "checkpoints").iterdir()) == before
