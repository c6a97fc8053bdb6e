"""train/eval.py: the intervals against independent computations, and evaluate() end to end.

evaluate() runs a scripted policy (a stand-in Generator replaying each task's expert trajectory turn by
turn through the real AgentLoop, ToolRunner and offline web, with a wrong final answer on chosen
tasks): pass@1 overall and by level / hops must equal the brute-force count of the tasks the script
answers correctly, and every episode must take the expert's turns.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from sailor_engine.config import load_config
from sailor_engine.model import Tokenizer
from sailor_engine.rollout.format import ChatTemplate
from sailor_engine.rollout.generator import Completion
from sailor_engine.synth.config import SynthConfig
from sailor_engine.synth.pipeline import synthesize
from sailor_engine.train import eval as ev

# -- intervals ---------------------------------------------------------------------------------


def _bisect(f, lo: float, hi: float) -> float:
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (47, 100), (1, 1000), (500, 1000)])
def test_wilson_is_the_score_test_inversion(k, n):
    """Wilson's interval = the p whose score test |p_hat - p| <= z sqrt(p (1 - p) / n) accepts; found by bisection."""
    z, ph = ev.Z95, k / n
    accept = lambda p: abs(ph - p) <= z * math.sqrt(p * (1 - p) / n)  # noqa: E731
    lo = 0.0 if k == 0 else _bisect(lambda p: not accept(p), 0.0, ph)
    hi = 1.0 if k == n else _bisect(accept, ph, 1.0)
    e = ev.wilson(k, n)
    assert e.mean == ph and e.n == n
    assert e.lo == pytest.approx(lo, abs=1e-9) and e.hi == pytest.approx(hi, abs=1e-9)


def test_mean_interval_and_paired_difference():
    rng = random.Random(0)
    xs = [rng.random() for _ in range(50)]
    e = ev.mean_interval(xs)
    half = ev.Z95 * statistics.stdev(xs) / math.sqrt(len(xs))
    assert e.mean == pytest.approx(statistics.fmean(xs)) and e.n == 50
    assert (e.lo, e.hi) == pytest.approx((e.mean - half, e.mean + half))

    def result(rates: dict[str, list[bool]]) -> ev.EvalResult:
        ts = tuple(ev.TaskResult(i, 1, 1, tuple(c), tuple(c), (1,) * len(c), 0) for i, c in rates.items())
        return ev.EvalResult("sampled", 1.0, 2, ts, 0.0)

    a = result({"x": [1, 1], "y": [0, 1], "z": [0, 0], "only_a": [1, 1]})
    b = result({"z": [1, 0], "y": [0, 0], "x": [1, 1]})
    d = ev.paired_difference(a, b)  # per task: x 0, y +0.5, z -0.5 (only_a has no partner)
    want = ev.mean_interval([0.0, 0.5, -0.5], bounds=(-1, 1))
    assert d == want and d.n == 3 and d.mean == 0.0
    assert a.pass1() == ev.wilson(2.5, 4)  # per-task rates 1, 0.5, 0, 1: Wilson over 4 tasks
    zero = result({"x": [0, 0], "y": [0, 0]}).pass1()
    assert zero.mean == zero.lo == 0 and zero.hi > 0.3  # all wrong: still an upper bound, not [0, 0]
    with pytest.raises(ValueError, match="share no task"):
        ev.paired_difference(a, result({"w": [1, 1]}))


# -- evaluate() with a scripted policy ---------------------------------------------------------

SYNTH = SynthConfig(seed=1, num_entities=60, num_questions=60, max_hops=2, level_mix=(1, 1, 0), vocab_size=384,
                    min_pair_frequency=2, expert_max_tokens=1600, expert_min_tool_calls=1)


class ScriptGen:
    """Generator stand-in: session i replays the assistant turns of its task's expert trajectory."""

    def __init__(self, tok, scripts: dict[str, list[str]], max_seq_len: int = 4096):
        self.tok, self.scripts, self.max_seq_len = tok, scripts, max_seq_len
        self.sessions: dict[int, list] = {}  # id -> [context text, remaining turns]
        self.pending: list = []
        self.submitted_params = []

    def open_session(self):
        session = type("S", (), {})()
        session.id = len(self.sessions)
        self.sessions[session.id] = None
        return session

    def submit(self, session, tokens, params, *, rng=None):
        self.submitted_params.append(params)
        if self.sessions[session.id] is None:  # the prompt: find the task by its question
            text = self.tok.decode(tokens)
            q = next(q for q in self.scripts if q in text)
            self.sessions[session.id] = list(self.scripts[q])
        self.pending.append(session)

    def has_work(self):
        return bool(self.pending)

    def step(self):
        out = []
        for s in self.pending:
            ids = self.tok.encode(self.sessions[s.id].pop(0))
            out.append((s, Completion(ids, [-0.5] * len(ids), "stop")))
        self.pending = []
        return out

    def close_session(self, session):
        pass


@pytest.fixture(scope="module")
def world():
    return synthesize(SYNTH)


@pytest.mark.parametrize("samples", [0, 3])
def test_evaluate_counts_what_a_scripted_policy_solves(world, monkeypatch, samples):
    tok = Tokenizer(world.tokenizer)
    tpl = ChatTemplate(tok)
    experts = {e.task_id: e for e in world.experts}
    tasks = [t for t in world.train if t.id in experts][:16]
    wrong = {t.id for t in tasks[::3]}  # the script answers these wrongly
    scripts = {}
    for t in tasks:
        turns = [m.content for m in experts[t.id].messages if m.role == "assistant"]
        if t.id in wrong:
            turns[-1] = "<think>A guess.</think>\n<answer>Nobody In Particular</answer>"
        scripts[t.question] = turns
    gens = []

    def fake_generator(model, max_batch, max_seq_len):
        gens.append(ScriptGen(tok, scripts, max_seq_len))
        return gens[-1]

    monkeypatch.setattr(ev, "Generator", fake_generator)
    cfg = load_config(None, ["rollout.max_turns=20", "rollout.max_context=4096", "rollout.temperature=0.7"])
    model = torch.nn.Linear(1, 1)  # only its train/eval mode is touched
    system = experts[tasks[0].id].messages[0].content
    res = ev.evaluate(model, world.web, tpl, tasks, cfg, samples=samples, system=system)

    G = max(samples, 1)
    assert res.mode == ("greedy" if samples == 0 else "sampled") and res.samples == G and model.training
    assert all(p.greedy == (samples == 0) for p in gens[0].submitted_params)
    assert [t.id for t in res.tasks] == [t.id for t in tasks]
    for r, t in zip(res.tasks, tasks):
        n_asst = sum(m.role == "assistant" for m in experts[t.id].messages)
        assert r.correct == (t.id not in wrong,) * G and r.format_ok == (True,) * G
        assert r.turns == (n_asst,) * G and r.tool_calls == (n_asst - 1) * G
    solved = [t for t in tasks if t.id not in wrong]
    if samples == 0:
        assert res.pass1() == ev.wilson(len(solved), len(tasks))
    else:
        assert res.pass1() == ev.wilson(len(solved), len(tasks))  # every rate is 0 or 1 here
    for key in ("level", "hops"):
        for v, est in res.by(key).items():
            group = [t for t in tasks if getattr(t, key) == v]
            assert est.n == len(group) and est.mean == sum(t.id not in wrong for t in group) / len(group)
    s = res.summary()
    assert s["pass1"]["n"] == len(tasks) and s["format_ok"] == 1.0


def test_evaluate_rejects_bad_input(world):
    tpl = ChatTemplate(Tokenizer(world.tokenizer))
    cfg = load_config(None, [])
    with pytest.raises(ValueError, match="samples must be >= 0"):
        ev.evaluate(torch.nn.Linear(1, 1), world.web, tpl, world.test, cfg, samples=-1)
    with pytest.raises(ValueError, match="no tasks"):
        ev.evaluate(torch.nn.Linear(1, 1), world.web, tpl, [], cfg)


def test_save_load_round_trip(tmp_path):
    ts = (ev.TaskResult("a", 1, 1, (True, False), (True, True), (3, 4), 5),
          ev.TaskResult("b", 2, 2, (False, False), (False, True), (2, 8), 7))
    res = ev.EvalResult("sampled", 0.7, 2, ts, 1.5)
    res.save(tmp_path / "e" / "r.json")
    back = ev.EvalResult.load(tmp_path / "e" / "r.json")
    assert back == res and back.summary() == res.summary()
    assert [p.name for p in (tmp_path / "e").iterdir()] == ["r.json"]  # no temporary left


def test_load_policy_reads_hf_and_engine_checkpoints(tmp_path):
    from sailor_engine.model import ModelConfig, Transformer, save_hf
    from sailor_engine.parallel.checkpoint import save_checkpoint

    cfg = ModelConfig(family="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, qkv_bias=True)
    m = Transformer(cfg).init_weights(generator=torch.Generator().manual_seed(0))
    save_hf(m, tmp_path / "hf")
    save_checkpoint(m, tmp_path / "ckpt")
    x = torch.randint(128, (1, 9))
    for p in ("hf", "ckpt"):
        got = ev.load_policy(tmp_path / p)
        torch.testing.assert_close(got(x), m(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ev.load_policy(tmp_path / "missing")
