"""The RL question pool (train/pool.py) and dynamic sampling in the RL trainer.

Unit level: draws are a permutation of the active ids seeded by (seed, step) (the full pool's equal
step_tasks), rounds are disjoint, the state round-trips through JSON, a retirement follows
rl.dupo.prefilter's rule. Trainer level, with roll_out replaced by a fake whose verdict per
(task, step, sample) is known and recorded: the pre-filter drops exactly the questions whose G
rollouts were all correct (also all wrong under solved_or_failed), recounted from the recorded
rollouts; curation retires exactly the questions whose latest group was uninformative, and none of
them is drawn again; a run resumed from a mid-run checkpoint writes the uninterrupted run's metrics
and draws; a pool that runs dry stops the run cleanly; dynamic sampling stops at its target or at
algo.max_sampling_rounds, as a recount of the rounds says. One run with the real roll_out (random
policy) checks the wiring without fakes.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from sailor_engine.parallel.checkpoint import read_manifest
from sailor_engine.rl.dupo import prefilter
from sailor_engine.rl.rewards import RewardBatch
from sailor_engine.rollout.agent import Trajectory
from sailor_engine.synth.pipeline import synthesize, write_world
from sailor_engine.train import rl
from sailor_engine.train.__main__ import main
from sailor_engine.train.pool import QuestionPool, draw_order, prefilter_pass
from sailor_engine.train.rl import step_tasks
from sailor_engine.train.rollouts import Rollouts
from tests.train.tiny import MODEL_YAML, SYNTH

CONFIG = MODEL_YAML + """\
algo: {preset: custom, group_size: 4, updates_per_batch: 2}
rollout: {max_new_tokens: 16, max_turns: 2, max_context: 2048}
train:
  mode: rl
  data_dir: DATA
  micro_batch_tokens: 2048
  checkpoint_every: 1
  keep_last: 10
  rl: {questions_per_step: 4, steps: 5, lr: 1.0e-3}
"""
G, Q = 4, 4


# -- unit: the pool ------------------------------------------------------------------------------


def test_draws_are_seeded_permutations_of_the_active_ids():
    pool = QuestionPool(21)
    assert pool.draw(0, 3, 0, 4) == step_tasks(3, 21, 4, 0) == draw_order(0, 3, 21)[:4]
    rounds = [pool.draw(0, 3, r, 4) for r in range(6)]
    flat = [i for r in rounds for i in r]
    assert len(flat) == 21 and sorted(flat) == list(range(21)) and rounds[-1] == flat[20:]  # 5 x 4 + 1
    assert pool.draw(0, 3, 6, 4) == []
    pool.drop([0, 5])
    pool.update([7, 8, 9], torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.bool), "solved")
    assert pool.retired == [7] and 7 not in pool.active and 9 in pool.active
    order = draw_order(0, 3, len(pool.active))
    assert pool.draw(0, 3, 0, 4) == [pool.active[k] for k in order[:4]]
    assert not {0, 5, 7} & {i for r in range(6) for i in pool.draw(0, 3, r, 4)}
    back = QuestionPool.from_state(json.loads(json.dumps(pool.state())))
    assert (back.active, back.dropped, back.retired) == (pool.active, pool.dropped, pool.retired)


@pytest.mark.parametrize("mode", ["none", "solved", "solved_or_failed"])
def test_prefilter_pass_and_update_follow_the_recount(mode):
    g = torch.Generator().manual_seed(0)
    correct = torch.rand(30, G, generator=g) < torch.rand(30, 1, generator=g).round()  # many all-0 / all-1 rows
    correct[3] = True
    n = correct.sum(1).tolist()
    bad = {"none": set(), "solved": {i for i in range(30) if n[i] == G},
           "solved_or_failed": {i for i in range(30) if n[i] in (0, G)}}[mode]
    assert 3 in bad or mode == "none"
    pool = QuestionPool(40)
    chunks = []
    stats = prefilter_pass(pool, lambda ids, c: chunks.append(ids) or correct[ids], mode, chunk=7, limit=30)
    assert chunks == [list(range(lo, min(lo + 7, 30))) for lo in range(0, 30, 7)]
    assert pool.dropped == sorted(bad) and pool.active == [i for i in range(40) if i not in bad]
    assert stats["dropped"] == len(bad) and stats["active"] == 40 - len(bad)
    pool = QuestionPool(40)
    assert pool.update(list(range(10, 40)), correct, mode) == sorted(i + 10 for i in bad)


# -- trainer: a fake roll_out with known verdicts --------------------------------------------------


def verdict(idx: int, step: int, sample: int) -> bool:
    """Task idx % 3 == 0: always solved; 1: never; 2: at some steps solved by all, else by sample 0 only."""
    kind = idx % 3
    if kind < 2:
        return kind == 0
    return (idx + step) % 4 == 0 or sample == 0


class FakeRollOut:
    """roll_out's signature; records (step, round, task index, sample, correct) per episode."""

    def __init__(self, tasks, vocab: int):
        self.index = {t.id: i for i, t in enumerate(tasks)}
        self.vocab, self.records = vocab, []

    def __call__(self, model, runner, tpl, system, tasks, step, cfg, rt, first_episode=0, stage=None) -> Rollouts:
        rnd = first_episode // (Q * G)
        trajs, correct = [], []
        for t in tasks:
            i = self.index[t.id]
            for j in range(G):
                ok = verdict(i, step, j)
                self.records.append((step, rnd, i, j, ok))
                ids = [(i * 31 + j * 7 + k * 17) % (self.vocab - 1) + 1 for k in range(12)]
                mask = [0] * 6 + [1] * 6
                trajs.append(Trajectory(t.id, j, ids, mask, [-math.log(self.vocab) * m for m in mask], 6, "answered",
                                        t.answer if ok else "no", "", 1, [], 0, 0.01))
                correct.append(ok)
        c = torch.tensor(correct)
        scored = RewardBatch(c.float(), c, torch.ones_like(c), [], {})
        return Rollouts(trajs, scored, 0.01, 0.01, 0.0)

    def groups(self, steps) -> dict:
        """{(step, round): {task: [verdicts by sample]}} of the recorded episodes at `steps`."""
        out = defaultdict(lambda: defaultdict(list))
        for step, rnd, i, _, ok in self.records:
            if step in steps:
                out[step, rnd][i].append(ok)
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    w = synthesize(SYNTH)
    write_world(w, root / "data")
    (root / "run.yaml").write_text(CONFIG.replace("DATA", str(root / "data")))
    return root, w.train, w.tokenizer.get_vocab_size()


@pytest.fixture
def fake(world, monkeypatch):
    f = FakeRollOut(world[1], world[2])
    monkeypatch.setattr(rl, "roll_out", f)
    return f


def run(world, out: Path, *overrides: str) -> int:
    args = ["--config", str(world[0] / "run.yaml"), "--set", f"train.out_dir={out}"]
    for o in overrides:
        args += ["--set", o]
    return main(args)


def rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def pool_at(out: Path, step: int) -> dict:
    return read_manifest(out / "checkpoints" / f"step-{step:08d}")["extra"]["pool"]


@pytest.mark.parametrize("mode", ["solved", "solved_or_failed"])
def test_prefilter_and_curation_drop_exactly_the_uninformative(world, fake, tmp_path, mode):
    out = tmp_path / mode
    assert run(world, out, f"algo.prefilter={mode}", "train.rl.pool_size=21", "train.rl.prefilter_tasks=15") == 0
    lines = rows(out)
    pre, steps = lines[0], lines[1:]
    assert pre["step"] == 0 and pre["phase"] == "prefilter" and [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    uninformative = (lambda v: all(v)) if mode == "solved" else (lambda v: all(v) or not any(v))
    # The pass: G episodes of each of the first 15 questions, chunks of one step (4 questions) at steps -1, -2, ...
    seen = fake.groups(range(-10, 0))
    assert sorted(s for s, _ in seen) == [-4, -3, -2, -1]
    verdicts = {i: v for grp in seen.values() for i, v in grp.items()}
    assert sorted(verdicts) == list(range(15)) and all(len(v) == G for v in verdicts.values())
    dropped = sorted(i for i, v in verdicts.items() if uninformative(v))
    assert dropped and len(dropped) < 15
    assert pool_at(out, 5)["dropped"] == dropped
    assert (pre["prefilter_questions"], pre["prefilter_dropped"], pre["episodes"]) == (15, len(dropped), 15 * G)
    # RL: every step draws from the active ids only; a question leaves after an uninformative group.
    active, retired = [i for i in range(21) if i not in dropped], []
    for k in range(5):
        grp = fake.groups({k})[k, 0]
        drawn = list(grp)
        assert len(drawn) == min(Q, len(active)) and set(drawn) <= set(active)
        assert drawn == [active[j] for j in draw_order(0, k, len(active))[:Q]]  # the recounted active ids
        gone = [i for i in drawn if uninformative(grp[i])]
        retired += gone
        active = [i for i in active if i not in gone]
        row = steps[k]
        assert (row["pool_retired"], row["pool_active"], row["questions"]) == (len(gone), len(active), len(drawn))
        assert pool_at(out, k + 1)["retired"] == retired
    assert retired, "the fake's verdicts must retire someone, or this test checks nothing"


def test_resume_with_the_pool_equals_the_uninterrupted_run(world, fake, tmp_path):
    full = tmp_path / "full"
    over = ["algo.prefilter=solved_or_failed", "train.rl.pool_size=30"]
    assert run(world, full, *over) == 0
    first = list(fake.records)
    ref = rows(full)
    assert pool_at(full, 2)["retired"], "no retirement before the resume point: the test could not fail"
    state2 = QuestionPool.from_state(pool_at(full, 2))
    assert state2.draw(0, 2, 0, Q) != QuestionPool.from_state({**pool_at(full, 2), "retired": []}).draw(0, 2, 0, Q)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for k in (3, 4, 5):  # as if killed after step 5's metrics line, with step 2's checkpoint the newest
        shutil.rmtree(resumed / "checkpoints" / f"step-{k:08d}")
    fake.records.clear()
    assert run(world, resumed, *over) == 0
    assert all(r[0] >= 2 for r in fake.records)  # no second pre-filter pass, steps 3..5 only
    assert fake.records == [r for r in first if r[0] >= 2]
    got = rows(resumed)
    skip = {"time", "time_train", "time_rollout", "time_decode", "time_tool_wait", "time_prefilter",
            "rollout_tokens_per_s", "train_tokens_per_s"}
    strip = lambda rs: [{k: v for k, v in r.items() if k not in skip} for r in rs]  # noqa: E731
    assert strip(got) == strip(ref)  # CPU, the same model / optimizer / pool state: bit for bit
    assert pool_at(resumed, 5) == pool_at(full, 5)


def test_a_run_over_another_pool_is_not_resumed(world, fake, tmp_path, capsys):
    out = tmp_path / "pool"
    assert run(world, out, "train.rl.steps=1") == 0
    assert run(world, out, "train.rl.steps=2", "train.rl.balance_hops=true") == 2  # other tasks under the same ids
    assert "is not a checkpoint of this RL run" in capsys.readouterr().err
    assert [r["step"] for r in rows(out)] == [1]


def test_a_pool_that_runs_dry_stops_the_run_cleanly(world, fake, tmp_path, capsys):
    out = tmp_path / "dry"
    assert run(world, out, "algo.prefilter=solved_or_failed", "train.rl.pool_size=12") == 0
    steps = rows(out)[1:]
    last = len(steps)
    assert 0 < last < 5 and steps[-1]["pool_active"] < 2
    assert f"stopping after step {last} of 5" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == f"step-{last:08d}"
    assert (out / "hf").is_dir()
    assert run(world, out, "algo.prefilter=solved_or_failed", "train.rl.pool_size=12") == 0  # resumes, stops again
    assert len(rows(out)) == last + 1


@pytest.mark.parametrize("rounds", [2, 3])
def test_dynamic_sampling_reaches_its_target_or_stops_at_max_rounds(world, fake, tmp_path, rounds):
    out = tmp_path / f"dyn{rounds}"
    assert run(world, out, "algo.dynamic_sampling=true", f"algo.max_sampling_rounds={rounds}",
               "train.rl.pool_refresh=false") == 0
    outcomes = set()
    for k, row in enumerate(rows(out)):
        seen = fake.groups({k})
        used = sorted(r for s, r in seen)
        found, drawn = [], []
        for r in used:
            grp = seen[k, r]
            drawn += list(grp)
            found += [i for i, v in grp.items() if 0 < sum(v) < G]
        assert used == list(range(len(used)))
        # rounds stop as soon as the target is met, else at max_sampling_rounds
        met = [len([i for r in used[:n + 1] for i, v in seen[k, r].items() if 0 < sum(v) < G]) >= Q
               for n in range(len(used))]
        assert met.index(True) == len(used) - 1 if any(met) else len(used) == rounds
        assert len(set(drawn)) == len(drawn) == row["questions"] == Q * len(used)  # fresh questions each round
        assert row["dupo_rounds"] == len(used) and row["dupo_kept"] == min(Q, len(found))
        assert row["dupo_partial"] == int(len(found) < Q) and row["episodes"] == G * len(drawn)
        if row["dupo_kept"]:
            assert row["skipped"] is None and len(row["losses"]) == min(2, row["dupo_kept"])
        outcomes.add(row["dupo_partial"])
    assert outcomes == {0, 1}, "both outcomes must occur, or part of this test checks nothing"


def test_the_real_roll_out_runs_the_prefilter(world, tmp_path):
    """No fake: a random policy answers nothing, so solved_or_failed drops every pre-filtered question."""
    out = tmp_path / "real"
    assert run(world, out, "algo.prefilter=solved_or_failed", "train.rl.prefilter_tasks=4", "train.rl.steps=1",
               "algo.dynamic_sampling=true", "algo.max_sampling_rounds=2") == 0
    pre, step = rows(out)
    assert pre["prefilter_questions"] == 4 and pre["episodes"] == 4 * G
    assert pre["prefilter_dropped"] == 4 - pre["prefilter_kept"] == len(pool_at(out, 1)["dropped"])
    assert step["episodes"] == G * step["questions"] and step["dupo_rounds"] in (1, 2)


def test_config_errors(world, capsys, tmp_path):
    assert run(world, tmp_path / "bad", "train.rl.pool_size=999") == 2
    assert "train.rl.pool_size (999) is larger than the" in capsys.readouterr().err
    assert run(world, tmp_path / "bad", "train.rl.pool_size=3") == 2
    assert "train.rl.questions_per_step (4) is larger than train.rl.pool_size (3)" in capsys.readouterr().err


def test_prefilter_rule_is_rl_dupo_prefilter():
    correct = torch.tensor([[1, 1], [0, 0], [1, 0]], dtype=torch.bool)
    assert prefilter(correct, "solved")[0].tolist() == [False, True, True]
    pool = QuestionPool(3)
    assert pool.update([0, 1, 2], correct, "solved_or_failed") == [0, 1] and pool.active == [2]
