"""The non-finite guard (train.max_nonfinite_steps) in the RFT and RL loops, on a tiny synthesized world.

NaN / inf is injected by wrapping the loop's step function (rft.run_step, rl.run_update): one
gradient element set to NaN, or the returned loss replaced. RFT, single process: a skipped step is
logged (strict JSON, null for the non-finite number) and leaves parameters and AdamW state exactly
as they were; the reference for what follows is independent of the guard: the clean run's
checkpoint from before the skips, resumed as if it had been saved after them (its manifest's step
moved forward), writes the same later rows bit for bit. A persistent NaN stops the run through the
CLI with exit 3 and a message naming the step, the cause and the last good checkpoint, which is
left as it was, with nothing newer. RL: `_train`'s per-update guard on hand-made mini-batches; the
update after a skipped one equals that update applied alone to the initial state.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from sailor_engine import cli
from sailor_engine.config import load_config
from sailor_engine.parallel.data import unwrap
from sailor_engine.synth.pipeline import synthesize, write_world
from sailor_engine.train import rft, rl
from sailor_engine.train.__main__ import main
from sailor_engine.train.batching import Sequence
from sailor_engine.train.guards import NonFiniteGuard, TrainingStopped, finite_or_none, json_row
from sailor_engine.train.setup import Runtime, build_model, build_optimizer, load_rft_data, wrap_model
from tests.train.tiny import MODEL_YAML, SYNTH, load_trained

CONFIG = MODEL_YAML + """\
algo: {group_size: 2, updates_per_batch: 2}
train:
  data_dir: DATA
  micro_batch_tokens: 2048
  checkpoint_every: 1
  keep_last: 10
  rft: {batch_size: 6, epochs: 2, lr: 1.0e-2, warmup_steps: 2, min_lr_ratio: 0.1}
  rl: {lr: 1.0e-2, steps: 2}
"""
STEPS = 6  # 21 trajectories // 6 = 3 steps per epoch, 2 epochs


def strict(line: str) -> dict:
    def refuse(c):
        raise ValueError(f"not JSON: {c}")
    return json.loads(line, parse_constant=refuse)


def metrics(out: Path) -> list[dict]:
    return [strict(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def same_run(rows: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["tokens"], r["loss_tokens"]) for r in rows]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("guards")
    write_world(synthesize(SYNTH), root / "data")
    (root / "run.yaml").write_text(CONFIG.replace("DATA", str(root / "data")))
    return root


def args(world: Path, out: Path, *overrides: str) -> list[str]:
    return ["--config", str(world / "run.yaml"), "--set", f"train.out_dir={out}",
            *(a for o in overrides for a in ("--set", o))]


@pytest.fixture(scope="module")
def clean(world) -> Path:
    out = world / "clean"
    assert main(args(world, out)) == 0
    return out


def snapshot(net: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in net.named_parameters() if p in opt.state}
    return params, state


def assert_same_state(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    assert a[0].keys() == b[0].keys() and a[1].keys() == b[1].keys()
    for name in a[0]:
        assert torch.equal(a[0][name], b[0][name]), name
    for name in a[1]:
        assert a[1][name].keys() == b[1][name].keys()
        for k in a[1][name]:
            assert torch.equal(a[1][name][k], b[1][name][k]), (name, k)


def poison_grad(stage) -> None:
    p = next(unwrap(stage).parameters())
    p.grad.view(-1)[0] = float("nan")


class InjectRFT:
    """Wraps rft.run_step: faults {step (1-based): "grad" | "loss" | "inf"}; records the parameters and
    AdamW state every step starts from."""

    def __init__(self, monkeypatch, faults: dict[int, str]):
        self.faults, self.starts, self.opts = faults, [], []
        real_step, real_opt = rft.run_step, rft.build_optimizer

        def build_optimizer(params, cfg):
            self.opts.append(real_opt(params, cfg))
            return self.opts[-1]

        def run_step(stage, tp_group, mbs, rt):
            self.starts.append(snapshot(unwrap(stage), self.opts[-1]))
            loss, n = real_step(stage, tp_group, mbs, rt)
            fault = self.faults.get(len(self.starts))
            if fault == "grad":
                poison_grad(stage)
            elif fault in ("loss", "inf"):
                loss = float("nan") if fault == "loss" else float("inf")
            return loss, n

        monkeypatch.setattr(rft, "build_optimizer", build_optimizer)
        monkeypatch.setattr(rft, "run_step", run_step)


def test_guard_counts_consecutive_non_finite_steps():
    g = NonFiniteGuard(2, "ckpt/step-00000004")
    assert g.check(1.0, 0.5) is None and g.streak == 0
    assert g.check(float("nan"), 0.5) == "non-finite loss" and g.streak == 1
    g.stop_if_exhausted(5)  # 1 < 2: goes on
    assert g.check(1.0, 0.5) is None and g.streak == 0  # a good step ends the streak
    assert g.check(1.0, float("inf")) == "non-finite grad_norm"
    assert g.check(float("-inf"), float("nan")) == "non-finite loss" and g.exhausted
    with pytest.raises(TrainingStopped, match=r"step 8: non-finite loss for 2 consecutive optimizer steps "
                       r"\(train.max_nonfinite_steps = 2\); stopped without saving, the last good checkpoint is "
                       r"ckpt/step-00000004"):
        g.stop_if_exhausted(8)
    assert isinstance(TrainingStopped("x"), RuntimeError)
    one = NonFiniteGuard(1)
    assert one.check(math.nan, 0.0) == "non-finite loss"
    with pytest.raises(TrainingStopped, match="no checkpoint was written by this run"):
        one.stop_if_exhausted(1)
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        NonFiniteGuard(0)


def test_rows_are_strict_json():
    row = {"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "losses": [1.5, float("-inf")],
           "skipped": "non-finite loss", "n": 2}
    assert finite_or_none(row) == {"step": 3, "loss": None, "grad_norm": None, "losses": [1.5, None],
                                   "skipped": "non-finite loss", "n": 2}
    assert strict(json_row(row))["losses"] == [1.5, None]


def test_rft_skips_non_finite_steps_and_goes_on(world, clean, monkeypatch):
    out = world / "nan-twice"
    inject = InjectRFT(monkeypatch, {3: "grad", 4: "inf"})  # two in a row: below max_nonfinite_steps = 3
    assert main(args(world, out)) == 0
    rows, ref = metrics(out), metrics(clean)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["skipped"] for r in rows] == [None, None, "non-finite grad_norm", "non-finite loss", None, None]
    assert rows[2]["grad_norm"] is None and rows[2]["loss"] == ref[2]["loss"]  # step 3 ran on the clean state
    assert rows[3]["loss"] is None and math.isfinite(rows[3]["grad_norm"])
    assert same_run(rows[:2]) == same_run(ref[:2])
    # Steps 4 and 5 start exactly where step 3 did: weights and AdamW moments and step count.
    assert_same_state(inject.starts[3], inject.starts[2])
    assert_same_state(inject.starts[4], inject.starts[2])
    # No checkpoint of a skipped step.
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [f"step-{s:08d}" for s in (1, 2, 5, 6)], names

    # Reference: the clean run's step-2 checkpoint, resumed as if saved after step 4.
    again = world / "nan-reference"
    (again / "checkpoints").mkdir(parents=True)
    ckpt = again / "checkpoints" / "step-00000004"
    shutil.copytree(clean / "checkpoints" / "step-00000002", ckpt)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["extra"]["step"] = 4
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.undo()
    assert main(args(world, again)) == 0
    assert [r["step"] for r in metrics(again)] == [5, 6]
    assert same_run(rows[4:]) == same_run(metrics(again))  # bit for bit: CPU fp32 is deterministic
    assert rows[4:] != ref[4:]  # and not the clean run's: steps 3 and 4 did not happen


def test_rft_stops_after_max_nonfinite_steps(world, clean, monkeypatch, capsys):
    out = world / "nan-forever"
    InjectRFT(monkeypatch, {s: "grad" for s in range(2, STEPS + 1)})
    assert cli.main(["rft", *args(world, out, "train.max_nonfinite_steps=2")]) == 3
    err = capsys.readouterr().err.strip()
    last = out / "checkpoints" / "step-00000001"
    assert err == (f"sailor_engine.train: stopped: step 3: non-finite grad_norm for 2 consecutive optimizer steps "
                   f"(train.max_nonfinite_steps = 2); stopped without saving, the last good checkpoint is {last}")
    assert [r["skipped"] for r in metrics(out)] == [None, "non-finite grad_norm", "non-finite grad_norm"]
    assert sorted((out / "checkpoints").iterdir()) == [last] and not (out / "hf").exists()
    # The last good checkpoint loads, to the clean run's step 1 (weights and optimizer).
    got, want = (load(p) for p in (last, clean / "checkpoints" / "step-00000001"))
    assert_same_state(got, want)


def load(path: Path) -> tuple[dict, dict]:
    return snapshot(*load_trained(path))


# -- RL: the per-update guard of _train -----------------------------------------------------------


def rl_setup(world: Path, *overrides: str):
    cfg = load_config(world / "run.yaml", ["train.mode=rl", *overrides])
    rt = Runtime(None, 0, torch.device("cpu"))
    data = load_rft_data(cfg.train.data_dir, cfg)
    model = build_model(cfg, data.vocab_size, rt)  # the seeded random init: the same every call
    stage = wrap_model(model, cfg, rt)
    opt = build_optimizer(unwrap(stage).parameters(), cfg)
    # Mini-batches of two short expert trajectories, advantages +-1; old log-probs of a uniform policy,
    # which the random init nearly is (ratios near 1, few clipped).
    old = -math.log(model.cfg.vocab_size)
    seqs = sorted(data.seqs, key=lambda s: len(s.token_ids))[:6]
    minis = [[(Sequence(s.token_ids, s.loss_mask, [old] * len(s.token_ids)), a)
              for s, a in zip(seqs[2 * i:2 * i + 2], (1.0, -1.0))] for i in range(3)]
    return cfg, rt, model, stage, opt, minis


class InjectRL:
    """Wraps rl.run_update: faults {update call (1-based): "grad" | "loss"}; records the starting states."""

    def __init__(self, monkeypatch, faults: dict[int, str], opt):
        self.faults, self.starts = faults, []
        real = rl.run_update

        def run_update(stage, model, mini, cfg, rt, ref=None):
            self.starts.append(snapshot(unwrap(stage), opt))
            st = real(stage, model, mini, cfg, rt, ref)
            fault = self.faults.get(len(self.starts))
            if fault == "grad":
                poison_grad(stage)
            elif fault == "loss":
                st = dict(st, loss=float("nan"))
            return st

        monkeypatch.setattr(rl, "run_update", run_update)


def test_rl_skips_a_non_finite_update_and_stops_on_a_persistent_one(world, monkeypatch):
    cfg, rt, model, stage, opt, minis = rl_setup(world)
    net = unwrap(stage)
    inject = InjectRL(monkeypatch, {1: "grad"}, opt)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    row = rl._train(stage, model, net, opt, minis[:2], 0, cfg, rt, guard)
    assert row["skipped"].startswith("mini-batch 0: non-finite grad_norm (loss ") and row["nonfinite_updates"] == 1
    assert len(row["losses"]) == len(row["grad_norms"]) == 1 and guard.streak == 0
    assert strict(json_row(row))["skipped"] == row["skipped"]
    assert_same_state(inject.starts[1], inject.starts[0])  # the skipped update changed nothing
    after = snapshot(net, opt)
    assert not all(torch.equal(after[0][n], inject.starts[0][0][n]) for n in after[0])  # update 1 moved it
    monkeypatch.undo()

    # Reference: mini-batch 1 alone, applied to the same initial state (constant lr: the same step size).
    cfg2, rt2, model2, stage2, opt2, _ = rl_setup(world)
    ref = rl._train(stage2, model2, unwrap(stage2), opt2, minis[1:2], 0, cfg2, rt2, NonFiniteGuard(3))
    assert ref["skipped"] is None and (ref["losses"], ref["grad_norms"]) == (row["losses"], row["grad_norms"])
    assert_same_state(after, snapshot(unwrap(stage2), opt2))

    # Persistent: every update's loss is NaN; two in a row exhaust the guard, the third is not run.
    cfg3, rt3, model3, stage3, opt3, _ = rl_setup(world, "train.max_nonfinite_steps=2", "train.rl.steps=10")
    inject = InjectRL(monkeypatch, {i: "loss" for i in range(1, 4)}, opt3)
    guard = NonFiniteGuard(cfg3.train.max_nonfinite_steps, "out/checkpoints/step-00000007")
    row = rl._train(stage3, model3, unwrap(stage3), opt3, minis, 7, cfg3, rt3, guard)
    assert len(inject.starts) == 2 and guard.exhausted and row["nonfinite_updates"] == 2 and row["loss"] is None
    assert row["skipped"].count("non-finite loss") == 2
    assert_same_state(snapshot(unwrap(stage3), opt3), inject.starts[0])
    with pytest.raises(TrainingStopped, match="step 8: non-finite loss for 2 consecutive optimizer steps .* "
                                              "the last good checkpoint is out/checkpoints/step-00000007"):
        guard.stop_if_exhausted(8)
