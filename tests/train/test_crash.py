"""Crash safety of the RFT trainer: SIGKILL during training and during a checkpoint write.

Acceptance: a run killed with SIGKILL and started again (train.resume) writes the metrics the
uninterrupted run writes, bit for bit on the CPU (timing fields aside), also when the last line of
metrics.jsonl was cut short; a kill during a checkpoint
write leaves the previous checkpoint complete and loadable to exactly the weights saved, the
partial one is never taken for a checkpoint, and the next save into the same directory leaves no
temporary file behind; a deletion of an old checkpoint (keep_last) cut short leaves nothing that
looks complete. The killed runs are real processes (`python -m sailor_engine.train`, or a
driver that wraps the checkpoint writer so that the process kills itself at a chosen point of the
write); the resumed runs and the reference run in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sailor_engine.parallel.checkpoint import MANIFEST, remove_checkpoint
from sailor_engine.synth.pipeline import synthesize, write_world
from sailor_engine.train.__main__ import main
from sailor_engine.train.rft import complete_checkpoints
from tests.train.tiny import MODEL_YAML, SYNTH, load_trained

CONFIG = MODEL_YAML + """\
train:
  data_dir: DATA
  micro_batch_tokens: 2048
  checkpoint_every: 2
  keep_last: 2
  rft: {batch_size: 6, epochs: 4, lr: 1.0e-2, warmup_steps: 2, min_lr_ratio: 0.1}
"""
STEPS = 12  # 21 trajectories // 6 = 3 steps per epoch, 4 epochs
ENV = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    write_world(synthesize(SYNTH), root / "data")
    (root / "run.yaml").write_text(CONFIG.replace("DATA", str(root / "data")))
    return root


def args(world: Path, out: Path) -> list[str]:
    return ["--config", str(world / "run.yaml"), "--set", f"train.out_dir={out}"]


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def same_run(rows: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["tokens"], r["loss_tokens"], r["skipped"]) for r in rows]


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix("step-"))


def train(argv: list[str]) -> int:
    """The trainer in this process with one thread, as the killed subprocesses run (ENV): bit-equal
    metrics need the same reduction order, which the number of threads changes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(world) -> Path:
    out = world / "uninterrupted"
    assert train(args(world, out) + ["--set", f"train.keep_last={STEPS}"]) == 0  # every checkpoint, to compare
    return out


def weights(path: Path) -> tuple[dict, dict]:
    """A checkpoint's parameters and AdamW state, loaded the trainer's way."""
    model, opt = load_trained(path)
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: dict(opt.state[p]) for n, p in model.named_parameters()})


def assert_same_checkpoint(a: Path, b: Path) -> None:
    (pa, sa), (pb, sb) = weights(a), weights(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
    assert all(sa[n].keys() == sb[n].keys() and all(torch.equal(sa[n][k], sb[n][k]) for k in sa[n]) for n in sa)


def test_sigkill_during_training_then_resume(world, uninterrupted):
    out = world / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sailor_engine.train", *args(world, out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # Kill once a checkpoint past step 4 is complete and metrics.jsonl holds lines after it: the
        # resumed run has to cut them and write them again.
        while True:
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before it was killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint past step 4 in time"
            done = complete_checkpoints(out / "checkpoints")
            lines = (out / "metrics.jsonl").read_text().count("\n") if (out / "metrics.jsonl").exists() else 0
            if done and step_of(done[-1]) >= 4 and lines > step_of(done[-1]):
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    newest = step_of(complete_checkpoints(out / "checkpoints")[-1])
    assert newest < STEPS and len(metrics(out)) > newest and not (out / "hf").exists()
    with open(out / "metrics.jsonl", "a") as f:  # and as if the kill had cut a line short (a line is one write)
        f.write('{"step": 99, "loss": 4.')
    assert train(args(world, out)) == 0
    assert same_run(metrics(out)) == same_run(metrics(uninterrupted))  # exact: CPU fp32 is deterministic
    assert_same_checkpoint(out / "checkpoints" / f"step-{STEPS:08d}", uninterrupted / "checkpoints" / f"step-{STEPS:08d}")


# Runs the trainer with parallel.checkpoint.atomic_write wrapped: at the checkpoint of step KILL_AT the
# process SIGKILLs itself, at the point named by WHERE:
#   shard     inside the shard's write, the temporary file half written
#   manifest  the shard renamed into place, the manifest not yet written
DRIVER = """\
import os, signal, sys
from sailor_engine.parallel import checkpoint
from sailor_engine.train.__main__ import main

where, kill_at = sys.argv[1], f"step-{int(sys.argv[2]):08d}"
real = checkpoint.atomic_write

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def atomic(dest, write):
    if dest.parent.name == kill_at:
        if where == "manifest" and dest.name == checkpoint.MANIFEST:
            die()
        if where == "shard" and dest.name != checkpoint.MANIFEST:
            def half(tmp):
                write(tmp)
                os.truncate(tmp, os.path.getsize(tmp) // 2)
                die()
            return real(dest, half)
    return real(dest, write)

checkpoint.atomic_write = atomic
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where", ["shard", "manifest"])
def test_sigkill_during_a_checkpoint_write(world, uninterrupted, tmp_path, where):
    out = world / f"killed-in-{where}"
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    proc = subprocess.run([sys.executable, str(driver), where, "4", *args(world, out)], env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = out / "checkpoints"
    partial, previous = ckpts / "step-00000004", ckpts / "step-00000002"
    assert partial.is_dir() and not (partial / MANIFEST).exists()  # the kill did land inside step 4's save
    assert complete_checkpoints(ckpts) == [previous]  # the partial one is not taken for a checkpoint
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert_same_checkpoint(previous, uninterrupted / "checkpoints" / "step-00000002")  # exactly what was saved

    # Resumes from step 2 and saves step 4 again into the same directory (all kept, to look at it).
    assert train(args(world, out) + ["--set", f"train.keep_last={STEPS}"]) == 0
    assert same_run(metrics(out)) == same_run(metrics(uninterrupted))
    assert_same_checkpoint(ckpts / f"step-{STEPS:08d}", uninterrupted / "checkpoints" / f"step-{STEPS:08d}")
    leftovers = [p.relative_to(ckpts) for p in ckpts.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert leftovers == [], leftovers  # no temporary file of the killed write left behind


def test_a_deletion_cut_short_leaves_nothing_that_looks_complete(uninterrupted, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for s in (2, 4):
        shutil.copytree(uninterrupted / "checkpoints" / f"step-{s:08d}", root / f"step-{s:08d}")

    def killed(path, *args, **kwargs):  # deletes the shard, then the process dies
        next(Path(path).glob("*.safetensors")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        remove_checkpoint(root / "step-00000002")
    assert complete_checkpoints(root) == [root / "step-00000004"]
