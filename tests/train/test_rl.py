"""`python -m sailor_engine.train` in RL mode (train.mode=rl) on a tiny synthesized world.

The policy is RFT-initialised by running the RFT trainer into the test's directory first (a tiny
decoder that memorises the expert trajectories; the RL tasks are those experts' tasks, so some
sampled episodes are well-formed and correct and others not: groups carry signal). Single process:
two RL steps run end to end and write sane metrics (sampling and training log-probs agree at the
first update, every counter adds up), and a run resumed from a checkpoint writes the uninterrupted
run's metrics. Under torchrun (gloo) dp=2 (DDP, and FSDP2 gathered for the rollouts) reproduces the
single-process run's first step: the same trajectories (rewards, DUPO counts, tokens exactly; the CPU
generator is batch-invariant, so a trajectory does not depend on the rank or batch that produced it)
and losses and gradient norms to 1e-5 relative; so do pp=2 (each stage broadcasts its layers for the
rollouts, the updates run 1F1B) and pp=2 x dp=2 under FSDP2 (4 ranks). tp=2 rounds its generator's
sums otherwise: the single process replays its saved trajectories and matches its updates.
"""

from __future__ import annotations

import http.server
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sailor_engine.synth.pipeline import synthesize, write_world
from sailor_engine.train.__main__ import main
from sailor_engine.train.colocate import block
from sailor_engine.train.rl import step_tasks
from sailor_engine.train import rl
from sailor_engine.train.rollouts import Rollouts, episode_seed, load_rollouts, rollouts_path, score_rollouts
from tests.train.tiny import SYNTH

CONFIG = """\
model: {family: qwen2, qkv_bias: true, hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4,
        num_kv_heads: 2, max_position_embeddings: 2048}
synth: {expert_max_tokens: 1600}
algo: {group_size: 4, zero_variance: reward_std, prefilter: none, updates_per_batch: 2}
rollout: {max_new_tokens: 128, max_turns: 4, max_context: 2048}
train:
  data_dir: DATA
  micro_batch_tokens: 2048
  checkpoint_every: 1
  keep_last: 3
  rft: {batch_size: 6, epochs: EPOCHS, lr: 1.0e-2, warmup_steps: 2, min_lr_ratio: 0.1}
  rl: {questions_per_step: 4, steps: 2, lr: 1.0e-3}
"""
RFT_EPOCHS = 100  # 21 experts / 6 = 3 steps per epoch: the decoder memorises them (loss ~0.006)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rl")
    w = synthesize(SYNTH)
    seen = {t.task_id for t in w.experts}
    w.train = [t for t in w.train if t.id in seen]  # RL on the tasks the RFT model saw
    assert len(w.train) == len(w.experts) == 21
    write_world(w, root / "data")
    (root / "run.yaml").write_text(CONFIG.replace("DATA", str(root / "data")).replace("EPOCHS", str(RFT_EPOCHS)))
    assert main(["--config", str(root / "run.yaml"), "--set", f"train.out_dir={root / 'rft'}",
                 "--set", "train.checkpoint_every=0"]) == 0
    return root


def rl_args(world: Path, out: Path, *overrides: str) -> list[str]:
    args = ["--config", str(world / "run.yaml"), "--set", "train.mode=rl", "--set", f"train.out_dir={out}",
            "--set", f"train.init_from={world / 'rft' / 'hf'}"]
    for o in overrides:
        args += ["--set", o]
    return args


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


EXACT = ("step", "skipped", "reward_mean", "accuracy", "format_ok", "episodes", "answered", "turns_mean", "tool_calls",
         "rollout_tokens", "dupo_kept", "dupo_duplicated", "loss_tokens", "train_tokens", "lr")


def assert_same_run(got: list[dict], ref: list[dict]) -> float:
    """Same trajectories (counts and rewards exactly), per-update losses and grad norms to 1e-5 relative;
    returns the largest relative difference."""
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        assert {k: g.get(k) for k in EXACT} == {k: r.get(k) for k in EXACT}
        for a, b in zip(g["losses"] + g["grad_norms"], r["losses"] + r["grad_norms"], strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (g, r)
            worst = max(worst, abs(a - b) / abs(b))
    return worst


@pytest.fixture(scope="module")
def single(world) -> Path:
    out = world / "single"
    assert main(rl_args(world, out)) == 0
    return out


def test_single_process_runs_end_to_end(single):
    rows = metrics(single)
    assert [r["step"] for r in rows] == [1, 2]
    trained = [r for r in rows if r["skipped"] is None]
    assert trained, [r["skipped"] for r in rows]
    for r in rows:
        assert r["episodes"] == 16 and r["answered"] + r["max_turns"] + r["max_context"] == 16
        assert 0 <= r["accuracy"] <= r["format_ok"] <= 1 and 0 <= r["reward_mean"] <= 1  # v1: 0.1 format + 0.9 answer
        dropped = r["dupo_dropped_all_correct"] + r["dupo_dropped_all_wrong"] + r["dupo_dropped_other"]
        assert r["dupo_kept"] + dropped == 4
        assert r["tool_calls"] >= r["tool_errors"] >= 0 and r["rollout_tokens"] > 0 and r["time_rollout"] > 0
    for r in trained:
        assert r["dupo_kept"] + r["dupo_duplicated"] == r["dupo_batch_groups"] == 4
        assert len(r["losses"]) == len(r["grad_norms"]) == len(r["clip_frac_low"]) == 2  # updates_per_batch
        assert r["lr"] == pytest.approx(1e-3) and r["grad_norm"] > 0 and r["train_tokens_per_s"] > 0
        # First update: the ratio is 1 up to the generator's vs the trainer's numerics; afterwards the
        # policy has moved (the second update's ratios differ from 1, some are clipped somewhere).
        assert r["logp_mismatch_max"] < 1e-4, r["logp_mismatch_max"]
        assert r["clip_frac_low"][0] == r["clip_frac_high"][0] == 0.0
        assert r["kl_old"][0] < 1e-6 and all(e > 0 for e in r["entropy"]) and "kl_ref" not in r
        assert 0 < r["response_tokens_mean"] <= r["response_tokens_max"] and r["tool_timeouts"] == 0
    assert any(max(r["clip_frac_low"][1], r["clip_frac_high"][1]) > 0 for r in trained)
    assert any(r["kl_old"][1] > 1e-6 for r in trained)  # the second update's policy has moved
    assert (single / "hf").is_dir() and len(list((single / "checkpoints").iterdir())) == 2


def test_resume_continues_as_the_uninterrupted_run(world, single):
    out = world / "resumed"
    shutil.copytree(single, out)
    shutil.rmtree(out / "checkpoints" / "step-00000002")  # as if killed after step 2's metrics line
    assert main(rl_args(world, out)) == 0
    # Bitwise: the generator's rows do not depend on which episodes share a forward (tool timing), so
    # the sampling log-probs too are the same. Only the clocks and the tool cache (empty at the
    # restart) differ.
    got, ref = metrics(out), metrics(single)
    assert len(got) == len(ref) == 2 and got[0] == ref[0]  # step 1's line, kept from the first run
    moving = ("tool_cache_hits", "time")
    same = lambda row: {k: v for k, v in row.items() if not k.startswith(moving) and not k.endswith("_per_s")}  # noqa: E731
    assert same(got[1]) == same(ref[1]) and len(same(ref[1])) > 40


def test_kl_penalty_to_the_starting_policy(world):
    """algo.kl_coef: the reference is the policy RL starts from (train.init_from), so the first update's
    KL to it is exactly 0 (the same weights through the same forward), and it grows once the policy moves."""
    out = world / "kl"
    assert main(rl_args(world, out, "algo.kl_coef=0.5", "train.rl.steps=1")) == 0
    (row,) = metrics(out)
    assert row["skipped"] is None and row["kl_ref"][0] == 0.0 and row["kl_ref"][1] > 0


class _AlwaysCorrect(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions stub that judges every answer correct."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.asked.append(body["messages"][1]["content"])
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": "correct"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_judge_decides_where_exact_match_fails(world, single):
    """algo.judge: step 1 rolls out the episodes of the run without a judge (same weights and seeds);
    the judge is asked about exactly the extracted answers exact match rejected, once each, and its
    verdicts (here all "correct") are what the rewards count."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AlwaysCorrect)
    srv.asked = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    out = world / "judge"
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        assert main(rl_args(world, out, f"algo.judge.base_url={url}", "algo.judge.model=stub",
                            "train.rl.steps=1")) == 0
    finally:
        srv.shutdown()
    (row,), em = metrics(out), metrics(single)[0]
    assert row["rollout_tokens"] == em["rollout_tokens"] and row["episodes"] == em["episodes"]
    assert row["judge_calls"] == len(srv.asked) > 0 and row["judge_fallbacks"] == row["judge_retries"] == 0
    assert row["accuracy"] * row["episodes"] == pytest.approx(em["accuracy"] * em["episodes"] + row["judge_calls"])
    assert "judge_calls" not in em


def test_seeds_and_shares():
    assert step_tasks(3, 21, 4, 0) == step_tasks(3, 21, 4, 0) != step_tasks(4, 21, 4, 0)
    assert len(set(step_tasks(0, 21, 21, 0))) == 21
    assert [block(5, 2, i) for i in range(2)] == [(0, 3), (3, 5)] and block(1, 2, 1) == (1, 1)
    seeds = {episode_seed(s, k, e, 16) for s in range(2) for k in range(3) for e in range(16)}
    assert len(seeds) == 2 * 3 * 16


def test_config_errors_exit_2(world, capsys):
    judge = ["algo.judge.base_url=http://127.0.0.1:9/v1", "algo.judge.model=m", "algo.judge.api_key_env=SAILOR_NO_KEY"]
    assert main(rl_args(world, world / "bad", *judge)) == 2
    assert "algo.judge.api_key_env: environment variable SAILOR_NO_KEY is not set" in capsys.readouterr().err
    assert main(rl_args(world, world / "bad", "train.rl.questions_per_step=22")) == 2
    assert "train.rl.questions_per_step (22) is larger than the 21 training tasks" in capsys.readouterr().err


def torchrun(world: Path, out: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", "-m",
           "sailor_engine.train", *rl_args(world, out, *overrides)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.dist
@pytest.mark.parametrize("layout, nproc", [("parallel.data_parallel=ddp", 2), ("parallel.data_parallel=fsdp", 2),
                                           ("parallel.pp=2", 2), ("parallel.pp=2", 4)],
                         ids=["dp2-ddp", "dp2-fsdp", "pp2", "pp2-dp2-fsdp"])
def test_several_processes_match_the_single_process_run(world, single, layout, nproc):
    out = world / f"dist-{layout}-{nproc}"
    proc = torchrun(world, out, layout, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got, ref = metrics(out), metrics(single)
    # Step 1 starts from the same weights: the same trajectories, losses to 1e-5. After an update the
    # weights differ in the last bits (gradients summed over ranks / tp shards in another order), so a
    # sampled token may flip later on: step 2 is only required to run and to be sane.
    worst = assert_same_run(got[:1], ref[:1])
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    assert all(r["episodes"] == ref[0]["episodes"] and all(map(math.isfinite, r["losses"])) for r in got[1:])
    print(f"{layout}: max relative loss / grad-norm difference at step 1 {worst:.1e}")


@pytest.mark.dist
def test_tp2_updates_match_the_single_process_on_the_same_trajectories(world, monkeypatch):
    """Under tp the generator's row-parallel projections are two half-GEMMs summed by an all-reduce,
    which rounds unlike one GEMM: a sampled token may flip against the single process (one did in this
    world). So the tp2 run saves its rollouts (train.rl.save_rollouts) and the single process replays
    step 1's (roll_out replaced): the same rewards and DUPO batch, losses and grad norms to 1e-5."""
    out = world / "dist-tp2"
    proc = torchrun(world, out, "parallel.tp=2", "train.rl.save_rollouts=true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = load_rollouts(out, 1)

    def replay(model, runner, tpl, system, tasks, step, cfg, rt, first_episode=0, stage=None):
        episodes = [t for t in tasks for _ in range(cfg.algo.group_size)]
        assert step == first_episode == 0 and [s.trajectory.task_id for s in saved] == [t.id for t in episodes]
        trajs = [s.trajectory for s in saved]
        ro = Rollouts(trajs, score_rollouts(trajs, episodes, cfg, rt), 1.0, 0.5, 0.5)
        assert [(s.reward, s.correct) for s in ro.scored.scores] == [(s.reward, s.correct) for s in saved]
        return ro

    monkeypatch.setattr(rl, "roll_out", replay)
    assert main(rl_args(world, world / "tp2-replayed", "train.rl.steps=1")) == 0
    got = metrics(out)
    worst = assert_same_run(got[:1], metrics(world / "tp2-replayed"))
    assert [r["step"] for r in got] == [1, 2] and all(map(math.isfinite, got[1]["losses"]))
    assert len(load_rollouts(out, 2)) == got[1]["episodes"]
    print(f"tp2: max relative loss / grad-norm difference at step 1 {worst:.1e}")


@pytest.mark.dist
def test_group_tools_run_each_call_once_per_tp_group(run_workers):
    out = run_workers(Path(__file__).with_name("group_tools_worker.py"))
    assert "group tools ok" in out, out


def test_saved_rollouts_name_a_bad_line(tmp_path):
    path = rollouts_path(tmp_path, 3)
    path.parent.mkdir()
    path.write_text('{"step": 3}\nnot json\n')
    with pytest.raises(ValueError, match=r"step-00000003.jsonl:1: .*reward"):
        load_rollouts(tmp_path, 3)
    path.write_text("")
    assert load_rollouts(tmp_path, 3) == []


@pytest.mark.dist
def test_pp2_with_a_kl_penalty(world):
    """Under pp the last stage holds the whole reference: the first update's KL to it is that of the
    pipelined policy to the same weights run whole (0 up to rounding), and it grows after."""
    out = world / "pp2kl"
    proc = torchrun(world, out, "parallel.pp=2", "algo.kl_coef=0.5", "train.rl.steps=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = metrics(out)
    assert row["skipped"] is None and row["kl_ref"][0] < 1e-9 and row["kl_ref"][1] > 1e-6, row["kl_ref"]


def test_exclude_expert_tasks(world, capsys):
    """Every training task of this world has an expert trajectory: excluding them leaves nothing (exit 2).
    The positive case (synth.expert_fraction < 1) is tests/train/test_demo.py's."""
    assert main(rl_args(world, world / "excl", "train.rl.exclude_expert_tasks=true")) == 2
    assert "synth.expert_fraction < 1" in capsys.readouterr().err


def test_balance_hops_keeps_the_first_tasks_of_each_hop_count_in_file_order():
    from types import SimpleNamespace

    from sailor_engine.config import load_config
    from sailor_engine.train.rl import rl_tasks

    hops = [1, 1, 2, 1, 3, 1, 2, 1, 3, 2, 1, 3]
    train = [SimpleNamespace(id=f"q{k}", hops=h) for k, h in enumerate(hops)]
    experts = [SimpleNamespace(task_id="q0"), SimpleNamespace(task_id="q4")]
    world = SimpleNamespace(train=train, experts=experts)
    cfg = load_config(None, ["train.rl.balance_hops=true"])
    ids = [t.id for t in rl_tasks(world, cfg)]
    # 1-hop q0 q1 q3 q5 q7 q10, 2-hop q2 q6 q9, 3-hop q4 q8 q11 -> the first three of each
    assert ids == ["q0", "q1", "q2", "q3", "q4", "q6", "q8", "q9", "q11"]
    excl = load_config(None, ["train.rl.balance_hops=true", "train.rl.exclude_expert_tasks=true"])
    # without q0 / q4: 1-hop q1 q3 q5 q7 q10, 2-hop q2 q6 q9, 3-hop q8 q11 -> two of each
    assert [t.id for t in rl_tasks(world, excl)] == ["q1", "q2", "q3", "q6", "q8", "q11"]
    assert [t.id for t in rl_tasks(world, load_config(None, []))] == [t.id for t in train]


@pytest.mark.parametrize("budget", [32768, 16], ids=["one-micro-batch", "micro-batches"])
def test_update_stats_match_a_float64_reference(budget):
    """run_update's loss (clipped surrogate + KL penalty - entropy bonus), entropy, KL to the sampling
    policy and KL to the reference, against the same quantities from float64 logits of the padded
    forward (an independent path: no packing, no kernel)."""
    import copy

    import torch

    from sailor_engine.config import load_config
    from sailor_engine.model import ModelConfig, Transformer
    from sailor_engine.parallel.pipeline import PipelineStage, stage_layers
    from sailor_engine.rl.loss import global_norm, kl_penalty, rl_loss
    from sailor_engine.train.batching import Sequence
    from sailor_engine.train.rl import run_update
    from sailor_engine.train.setup import Runtime

    T = 0.7
    cfg = load_config(None, ["algo.kl_coef=0.2", "algo.entropy_coef=0.05", f"rollout.temperature={T}",
                             "model.max_position_embeddings=16",
                             "synth.expert_max_tokens=16", "rollout.max_context=16",
                             f"train.micro_batch_tokens={budget}"])
    mcfg = ModelConfig(family="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=2, num_kv_heads=1, qkv_bias=True)
    models = [Transformer(mcfg).init_weights(std=0.3, generator=torch.Generator().manual_seed(k)) for k in (0, 1)]
    stage, ref = (PipelineStage(m, stage_layers(mcfg, 1)[0], 0, 1) for m in models)
    ref.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    mini = []
    for n, adv in ((11, 1.0), (7, -0.5), (16, 0.8)):
        ids = torch.randint(0, 97, (n,), generator=g).tolist()
        mask = [0, 0, 0] + (torch.rand(n - 3, generator=g) < 0.7).long().tolist()
        old = (-4 * torch.rand(n, generator=g)).tolist()  # arbitrary sampling log-probs: KL > 0, some clipping
        mini.append((Sequence(ids, mask, old), adv))
    rt = Runtime(groups=None, rank=0, device=torch.device("cpu"))
    st = run_update(stage, models[0], mini, cfg, rt, ref)

    m64 = [copy.deepcopy(m).double() for m in models]  # the policy's copy keeps its gradients

    def logp64(model, ids):
        logits = model(torch.tensor([ids]))[0, :-1] / T
        return torch.log_softmax(logits, -1)  # (n - 1, V): position i predicts token i + 1

    cat = {k: [] for k in ("logp", "ref", "old", "mask", "ent", "seq")}
    for i, (s, _) in enumerate(mini):
        lp = logp64(m64[0], s.token_ids)
        with torch.no_grad():
            lr = logp64(m64[1], s.token_ids)
        tgt = torch.tensor(s.token_ids[1:])[:, None]
        cat["logp"].append(lp.gather(1, tgt)[:, 0])
        cat["ref"].append(lr.gather(1, tgt)[:, 0])
        cat["ent"].append(-(lp.exp() * lp).sum(-1))
        cat["old"].append(torch.tensor(s.logprobs[1:], dtype=torch.float64))
        cat["mask"].append(torch.tensor(s.loss_mask[1:], dtype=torch.float64))
        cat["seq"].append(torch.full((len(s.token_ids) - 1,), i))
    lp, lr, old, mask, ent, seq = (torch.cat(cat[k]) for k in ("logp", "ref", "old", "mask", "ent", "seq"))
    on = mask != 0
    assert st["loss_tokens"] == int(on.sum())
    assert st["entropy"] == pytest.approx(float(ent.detach()[on].mean()), rel=1e-5)
    x = lp.detach() - old
    assert st["kl_old"] == pytest.approx(float((x.exp() - x - 1)[on].mean()), rel=1e-5)
    assert st["kl_ref"] == pytest.approx(float(kl_penalty(lp.detach(), lr, "k3")[on].mean()), rel=1e-5)
    adv = torch.tensor([a for _, a in mini], dtype=torch.float64)
    loss, _ = rl_loss(lp, old, adv, mask, global_norm([mask], [seq]), cfg.algo, seq_ids=seq, ref_logp=lr, entropy=ent)
    assert st["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    loss.backward()  # every term's gradient, the entropy bonus's included, reached the parameters
    want = dict(m64[0].named_parameters())
    for name, p in models[0].named_parameters():
        err = float((p.grad.double() - want[name].grad).norm() / want[name].grad.norm())
        assert err < 1e-5, (name, err)
    assert st["clip_frac_low"] + st["clip_frac_high"] > 0  # the clipped regimes are exercised
