"""pass@1 on held-out tasks, greedy and sampled, by level and hops, with the number of tasks and a 95% interval.

    res = evaluate(model, web, tpl, tasks, cfg, rt, samples=0)      # greedy: one episode per task
    res = evaluate(model, web, tpl, tasks, cfg, rt, samples=4)      # sampled: 4 per task at rollout.temperature
    res.pass1()                 # Estimate(mean, lo, hi, n)
    res.by("hops")              # {1: Estimate, 2: Estimate}
    paired_difference(rl, rft)  # the same tasks under two policies: mean difference and its interval

Episodes are the RL loop's (Generator on the model's own weights, AgentLoop, offline search / visit on
a ToolRunner), so eval measures the policy the trainer trains, turn limits and all. Correctness is
rewards.score_batch's (exact match over the answer and its aliases, after normalisation).

Intervals. Greedy: one Bernoulli outcome per task, the Wilson score interval (exact enough at small n
and near 0 or 1, where the normal one fails). Sampled: the per-task success rates are the unit (tasks
are what varies between evals; samples of one task are not independent of it); a rate in [0, 1] with
mean p has variance at most p (1 - p), so the Wilson interval over the tasks bounds their mean
conservatively, and stays honest at 0% or 100% where an empirical standard deviation is 0. Two
policies on the same tasks are compared by the paired per-task differences, whose interval is far
tighter than the two separate ones when the policies agree on most tasks. Sampled evals draw from
seeds fixed by (seed, task, sample), the same for every policy, so paired comparisons also share
their random numbers.

Under torchrun the tasks are dealt to the dp ranks in contiguous blocks and the results gathered
(a tp group runs one agent loop, its tools on the first rank: colocate.GroupTools); every rank
returns the whole result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch
import torch.distributed as dist

from sailor_engine.config import Config
from sailor_engine.env.runner import ToolLimits, ToolRunner
from sailor_engine.env.tools import SearchTool, VisitTool
from sailor_engine.model import Transformer, load_hf
from sailor_engine.parallel.checkpoint import MANIFEST, checkpoint_config, load_checkpoint
from sailor_engine.rl.rewards import score_batch
from sailor_engine.rollout.agent import AgentLoop
from sailor_engine.rollout.format import ChatTemplate
from sailor_engine.rollout.generator import Generator, SamplingParams
from sailor_engine.train.colocate import GroupTools, block

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    mean: float
    lo: float  # 95% interval
    hi: float
    n: int  # tasks

    def __str__(self) -> str:
        return f"{100 * self.mean:.1f}% [{100 * self.lo:.1f}, {100 * self.hi:.1f}] (n={self.n})"

    def as_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n}


def wilson(successes: int, n: int, z: float = Z95) -> Estimate:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    p = successes / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return Estimate(p, min(p, max(0.0, mid - half)), max(p, min(1.0, mid + half)), n)  # exact 0 / 1 at the ends


def mean_interval(xs: Sequence[float], z: float = Z95, bounds: tuple[float, float] = (0.0, 1.0)) -> Estimate:
    """Mean of per-task values with a normal interval (sample standard deviation), clamped to `bounds`."""
    n = len(xs)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    half = z * sd / math.sqrt(n)
    return Estimate(m, max(bounds[0], m - half), min(bounds[1], m + half), n)


@dataclass(frozen=True)
class TaskResult:
    id: str
    level: int
    hops: int
    correct: tuple[bool, ...]  # one per episode
    format_ok: tuple[bool, ...]
    turns: tuple[int, ...]
    tool_calls: int

    @property
    def rate(self) -> float:
        return sum(self.correct) / len(self.correct)


@dataclass(frozen=True)
class EvalResult:
    mode: str  # "greedy" or "sampled"
    temperature: float
    samples: int  # episodes per task
    tasks: tuple[TaskResult, ...]
    wall_s: float

    def pass1(self, tasks: Sequence[TaskResult] | None = None) -> Estimate:
        ts = self.tasks if tasks is None else tasks
        if self.samples == 1:
            return wilson(sum(t.correct[0] for t in ts), len(ts))
        return wilson(sum(t.rate for t in ts), len(ts))  # a rate in [0, 1] varies at most as a Bernoulli

    def by(self, key: str) -> dict[int, Estimate]:
        """pass@1 per value of a task attribute ("level" or "hops")."""
        groups: dict[int, list[TaskResult]] = {}
        for t in self.tasks:
            groups.setdefault(getattr(t, key), []).append(t)
        return {k: self.pass1(v) for k, v in sorted(groups.items())}

    def format_ok(self) -> float:
        return sum(sum(t.format_ok) for t in self.tasks) / max(1, sum(len(t.format_ok) for t in self.tasks))

    def summary(self) -> dict:
        """A flat JSON-able record: what metrics.jsonl and the demo's table print."""
        return {"mode": self.mode, "temperature": self.temperature, "samples": self.samples,
                "pass1": self.pass1().as_dict(),
                "by_level": {str(k): v.as_dict() for k, v in self.by("level").items()},
                "by_hops": {str(k): v.as_dict() for k, v in self.by("hops").items()},
                "format_ok": self.format_ok(),
                "turns_mean": sum(sum(t.turns) for t in self.tasks) / max(1, self.samples * len(self.tasks)),
                "tool_calls_mean": sum(t.tool_calls for t in self.tasks) / max(1, self.samples * len(self.tasks)),
                "wall_s": self.wall_s}

    def save(self, path: str | Path) -> None:
        """The summary and every task's outcome, as JSON (written to a temporary name, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rec = {**self.summary(), "tasks": [dataclasses.asdict(t) for t in self.tasks]}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        d = json.loads(Path(path).read_text())
        return cls(d["mode"], d["temperature"], d["samples"], tuple(_task_result(t) for t in d["tasks"]), d["wall_s"])


def _task_result(d: dict) -> TaskResult:
    return TaskResult(d["id"], d["level"], d["hops"], tuple(d["correct"]), tuple(d["format_ok"]), tuple(d["turns"]),
                      d["tool_calls"])


def paired_difference(a: EvalResult, b: EvalResult) -> Estimate:
    """pass@1(a) - pass@1(b) over the tasks both evaluated, from the per-task differences."""
    rb = {t.id: t.rate for t in b.tasks}
    diffs = [t.rate - rb[t.id] for t in a.tasks if t.id in rb]
    if not diffs:
        raise ValueError("paired_difference: the two evals share no task")
    return mean_interval(diffs, bounds=(-1.0, 1.0))


def evaluate(model, web, tpl: ChatTemplate, tasks: Sequence, cfg: Config, rt=None, *, samples: int = 0,
             system: str | None = None, seed: int = 0, runner: ToolRunner | None = None) -> EvalResult:
    """Greedy pass@1 (samples = 0) or sampled pass@1 from `samples` episodes per task at rollout.temperature.

    `web` is the OfflineWeb the tools read (ignored when a `runner` is given); `rt` a train Runtime
    (None: one process). The model runs in eval mode and is put back in its previous mode.
    """
    if samples < 0:
        raise ValueError(f"evaluate: samples must be >= 0, got {samples}")
    if not tasks:
        raise ValueError("evaluate: no tasks")
    r = cfg.rollout
    greedy = samples == 0
    G = 1 if greedy else samples
    dp, dp_rank, tp = (1, 0, 1) if rt is None else (rt.dp, rt.dp_rank, rt.tp)
    lo, hi = block(len(tasks), dp, dp_rank)
    params = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                            greedy=greedy, seed=seed * 1_000_003 + lo * G)
    tic = time.perf_counter()
    mine: list[TaskResult] = []
    own = runner is None
    if own:
        runner = ToolRunner([SearchTool(web), VisitTool(web)], limits=ToolLimits(timeout_s=r.tool_timeout_s))
    try:
        if hi > lo:
            # Chunks of at most rollout.max_batch episodes: more sessions than cache rows would evict
            # idle episodes and prefill their whole history again when they resume.
            per = max(1, r.max_batch // G)
            gen = Generator(model, max_batch=min(r.max_batch, (hi - lo) * G),
                            max_seq_len=r.max_context or model.cfg.max_position_embeddings)
            trajs = []
            tools = GroupTools(runner, rt.groups.tp) if tp > 1 else runner
            was_training = model.training
            model.eval()
            try:
                for c in range(lo, hi, per):
                    p = msgspec.structs.replace(params, seed=seed * 1_000_003 + c * G)
                    loop = AgentLoop(gen, tools, tpl, params=p, max_turns=r.max_turns, system=system)
                    trajs += loop.run(tasks[c:min(c + per, hi)], group_size=G)
            finally:
                model.train(was_training)
            answers = [[t.answer, *t.aliases] for t in tasks[lo:hi] for _ in range(G)]
            scored = score_batch([t.response for t in trajs], answers, cfg.algo)
            for i, t in enumerate(tasks[lo:hi]):
                eps = range(i * G, (i + 1) * G)
                mine.append(TaskResult(t.id, t.level, t.hops, tuple(bool(scored.correct[e]) for e in eps),
                                       tuple(bool(scored.format_ok[e]) for e in eps),
                                       tuple(trajs[e].turns for e in eps), sum(len(trajs[e].tool_calls) for e in eps)))
    finally:
        if own:
            runner.close()
    parts = [mine]
    if rt is not None and rt.dp_group is not None:
        parts = [None] * dp
        dist.all_gather_object(parts, mine, group=rt.dp_group)
    wall = time.perf_counter() - tic
    if rt is not None and rt.dp_group is not None:
        t = torch.tensor([wall], dtype=torch.float64, device=rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=rt.dp_group)
        wall = float(t)
    return EvalResult("greedy" if greedy else "sampled", 0.0 if greedy else r.temperature, G,
                      tuple(x for p in parts for x in p), wall)


def load_policy(path: str | Path) -> Transformer:
    """A model to evaluate, in fp32 on the CPU: an HF directory or an engine checkpoint (manifest.json)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (an HF model or an engine checkpoint)")
    if (path / MANIFEST).is_file():
        model = Transformer(checkpoint_config(path))
        load_checkpoint(model, path)
        return model
    return load_hf(path, dtype=torch.float32)
