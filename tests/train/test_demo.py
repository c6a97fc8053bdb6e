"""`sailor-engine demo` end to end on a tiny world: a few RFT and RL steps, evals, the table, the outputs.

A smoke test of the wiring (the CI's "few RFT and RL steps of the tiny config"), not of learning: the
learning numbers are the README's, from the full demo. What it checks: every stage ran through the
trainer (metrics rows of both phases, checkpoints, HF exports, plots), the RL pool is disjoint from
the RFT experts' tasks, the evals cover the held-out tasks they claim with intervals that contain
their means, the paired differences are those of the saved per-task outcomes, and a rerun resumes
every stage from its outputs instead of training again.
"""

from __future__ import annotations

import json

import pytest

from sailor_engine.config import ConfigError
from sailor_engine.synth.pipeline import load_world
from sailor_engine.train.demo import demo_config, run_demo
from sailor_engine.train.eval import EvalResult, paired_difference

TINY = (
    "synth.num_entities=60", "synth.num_questions=80", "synth.vocab_size=384", "synth.min_pair_frequency=2",
    "synth.expert_min_tool_calls=1", "synth.expert_max_tokens=1600",
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2",
    "model.num_kv_heads=1", "rollout.max_new_tokens=24", "rollout.max_turns=3", "rollout.max_batch=64",
    "train.drill.steps=3", "train.rft.max_steps=3", "train.rft.batch_size=4", "train.checkpoint_every=0",
    "train.micro_batch_tokens=4096",
    "train.rl.steps=2", "train.rl.questions_per_step=2", "algo.group_size=2", "algo.zero_variance=reward_std",
    "train.eval_tasks=6", "train.eval_samples=2",
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = demo_config(None, TINY + (f"train.out_dir={out}",))
    return out, cfg, run_demo(cfg)


def _rows(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_every_stage_ran_through_the_trainer(demo):
    out, cfg, res = demo
    rft, rl = _rows(out / "rft" / "metrics.jsonl"), _rows(out / "rl" / "metrics.jsonl")
    assert [r["step"] for r in rft] == [1, 2, 3] and [r["step"] for r in rl] == [1, 2]
    drills = _rows(out / "base" / "metrics.jsonl")
    assert [r["step"] for r in drills] == [1, 2, 3] and (out / "base" / "hf" / "config.json").is_file()
    assert all(r["episodes"] == 4 for r in rl)  # questions_per_step x G
    for phase in ("rft", "rl"):
        assert (out / phase / "hf" / "config.json").is_file()
        assert any((out / phase / "plots").glob("*.png"))
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["evals"]) == {"untrained", "rft", "rl"} and summary["wall_s"] > 0


def test_the_rl_pool_is_disjoint_from_the_experts(demo):
    out, cfg, _ = demo
    world = load_world(out / "data", cfg.synth)
    expert_tasks = {e.task_id for e in world.experts}
    assert expert_tasks and len(expert_tasks) < len(world.train)
    from sailor_engine.train.rl import rl_tasks

    pool = rl_tasks(world, cfg)
    assert pool and not {t.id for t in pool} & expert_tasks


def test_evals_and_paired_differences(demo):
    out, cfg, res = demo
    world = load_world(out / "data", cfg.synth)
    want = [t.id for t in world.test[:6]]
    for stage, ms in res.evals.items():
        assert set(ms) == ({"greedy"} if stage == "untrained" else {"greedy", "sampled"})
        for mode, r in ms.items():
            assert [t.id for t in r.tasks] == want and r.samples == (1 if mode == "greedy" else 2)
            p = r.pass1()
            assert p.n == 6 and p.lo <= p.mean <= p.hi
            assert EvalResult.load(out / "eval" / f"{stage}.{mode}.json") == r
    for mode, d in res.diffs.items():
        rl, rft = (EvalResult.load(out / "eval" / f"{s}.{mode}.json") for s in ("rl", "rft"))
        assert d == paired_difference(rl, rft)


def test_a_rerun_resumes_every_stage(demo, capsys):
    out, cfg, res = demo
    ckpts = lambda: {p: p.stat().st_mtime_ns  # noqa: E731
                     for p in [*out.glob("*/checkpoints/*/*"), *out.glob("base/hf/*")]}
    before = ckpts()
    again = run_demo(cfg)
    assert before and ckpts() == before
    assert again.diffs == res.diffs


def test_a_directory_of_another_run_is_refused(demo, tmp_path):
    out, cfg, _ = demo
    other = demo_config(None, TINY + (f"train.out_dir={out}", "train.rl.steps=3"))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ConfigError, match="another config"):
        run_demo(other)
    (tmp_path / "x").write_text("not a demo")
    with pytest.raises(ConfigError, match="not a demo run directory"):
        run_demo(demo_config(None, TINY + (f"train.out_dir={tmp_path}",)))
    assert sorted(p.name for p in out.iterdir()) == before and [p.name for p in tmp_path.iterdir()] == ["x"]
