"""The RL step's rollouts: colocated generation on the trainer's own module, gathered and scored.

    ro = roll_out(model, runner, tpl, system, tasks, step, cfg, rt, stage=stage)
    ro.trajs, ro.scored          # every rank's trajectories in (task, sample) order, their rewards

The step's questions are dealt to the rollout ranks (dp x pp) in contiguous blocks; each runs
algo.group_size ReAct episodes per question with the Generator on the trainer's own module (eval mode,
inference) + AgentLoop + the ToolRunner. Episode e of the step (e = round * questions_per_step * G +
task * G + sample) samples from the RNG seeded by `episode_seed(seed, step, e)`, so a trajectory does
not depend on which rank generated it. Every rank then gathers all trajectories (all_gather_object
over pp, then dp) and holds the same rewards (`score_rollouts`).

Bitwise on CPU, on any number of intra-op threads: a generator row's numerics depend neither on the
rows it shares a step with nor on how its tokens were chunked into forwards, so an episode parked on a
tool that lost its cache row re-prefills the same state (model/attention.py, _attend_rows;
model/transformer.py, _rows_aligned and _swiglu_).

Layouts. Tensor parallelism: the ranks of a tp group roll out the same episodes and must run every
generator forward together, but the agent loop's batches follow tool timing and tools need not
answer every rank alike. So with tp > 1 the group's first rank runs the tool calls and decides,
for every rank, when each is done (`colocate.GroupTools`): one broadcast per turn of the loop, tool
latency still hidden behind decoding. FSDP2: the parameters are gathered whole on every rank for the
rollouts (`parallel.data.gathered`: one all-gather per step, no collective while generating) and
sharded again for the updates. Pipeline parallelism: every rank builds the whole model and trains its
stage's part; before the rollouts each stage broadcasts its parameters over the pp group
(`whole_model`). Costs a whole copy of the weights (not of the optimizer state) per rank.

Rewards: offline exact match / F1, or with algo.judge an LLM endpoint asked by rank 0 where exact
match rejected an extracted answer, its verdicts broadcast (`score_rollouts`).

With train.rl.save_rollouts, global rank 0 writes each step's trajectories and scores to
out_dir/rollouts/step-NNNNNNNN.jsonl (`save_rollouts`; `load_rollouts` reads them back, typed).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch
import torch.distributed as dist

from sailor_engine.config import Config
from sailor_engine.env.runner import ToolRunner
from sailor_engine.parallel.checkpoint import atomic_write
from sailor_engine.parallel.data import gathered
from sailor_engine.parallel.pipeline import stage_layers
from sailor_engine.rl.judge import HttpJudge
from sailor_engine.rl.rewards import RewardBatch, score_batch, score_batch_async
from sailor_engine.rollout.agent import AgentLoop, Trajectory
from sailor_engine.rollout.format import ChatTemplate
from sailor_engine.rollout.generator import Generator, SamplingParams
from sailor_engine.synth.pipeline import read_jsonl
from sailor_engine.train.colocate import GroupTools, block
from sailor_engine.train.setup import Runtime


def episode_seed(seed: int, step: int, episode: int, episodes_per_step: int) -> int:
    """Sampling seed of episode `episode` (= task * G + sample) of a step: distinct over (seed, step, episode)."""
    return (seed * 1_000_003 + step) * episodes_per_step + episode


def episodes_per_step(cfg: Config) -> int:
    """Episodes a step may roll out: G per question, questions_per_step per round, rounds of dynamic sampling."""
    rounds = cfg.algo.max_sampling_rounds if cfg.algo.dynamic_sampling else 1
    return cfg.train.rl.questions_per_step * cfg.algo.group_size * rounds


@dataclass
class Rollouts:
    trajs: list[Trajectory]  # every rank's, ordered by (task, sample)
    scored: RewardBatch
    wall_s: float  # the slowest rank's
    decode_s: float
    tool_wait_s: float


def roll_out(model, runner: ToolRunner, tpl: ChatTemplate, system: str | None, tasks: list, step: int,
             cfg: Config, rt: Runtime, first_episode: int = 0, stage=None) -> Rollouts:
    """This rank's block of `tasks` x algo.group_size episodes, gathered over dp x pp and scored.

    Episode e of `tasks` is episode first_episode + e of the step (a later dynamic-sampling round
    starts past the earlier rounds' episodes), seeded by episode_seed over `episodes_per_step(cfg)`.
    `stage`: the training module around `model` (FSDP2: its parameters are gathered for the rollouts,
    on every dp rank, also one without episodes)."""
    G, r = cfg.algo.group_size, cfg.rollout
    # rollouts are split over dp x pp (every pp rank generates with the whole model); a tp group shares a block
    lo, hi = block(len(tasks), rt.dp * rt.pp, rt.dp_rank * rt.pp + rt.pp_rank)
    tic = time.perf_counter()
    params = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                            seed=episode_seed(cfg.train.seed, step, first_episode + lo * G, episodes_per_step(cfg)))
    max_len = r.max_context or model.cfg.max_position_embeddings
    stats = {"decode_s": 0.0, "tool_wait_s": 0.0}
    mine: list[Trajectory] = []
    with gathered(stage if stage is not None else model, layers_reshard_after_forward=rt.pp == 1):
        if rt.pp > 1:
            whole_model(model, rt)
        if hi > lo:
            gen = Generator(model, max_batch=min(r.max_batch, (hi - lo) * G), max_seq_len=max_len)
            loop = AgentLoop(gen, GroupTools(runner, rt.groups.tp) if rt.tp > 1 else runner, tpl, params=params,
                             max_turns=r.max_turns, system=system)
            model.eval()
            try:
                mine = loop.run(tasks[lo:hi], group_size=G)
            finally:
                model.train()
            stats = loop.stats
    local = (mine, time.perf_counter() - tic, stats["decode_s"], stats["tool_wait_s"])
    parts = [local]
    for group, size in ((rt.groups.pp if rt.pp > 1 else None, rt.pp), (rt.dp_group, rt.dp)):
        if group is not None:  # pp first, then dp: the blocks come back in (dp, pp) order
            gathered_parts = [None] * size
            dist.all_gather_object(gathered_parts, parts, group=group)
            parts = [x for part in gathered_parts for x in part]
    trajs = [t for part in parts for t in part[0]]
    scored = score_rollouts(trajs, [t for t in tasks for _ in range(G)], cfg, rt)
    return Rollouts(trajs, scored, max(p[1] for p in parts), max(p[2] for p in parts), max(p[3] for p in parts))


def whole_model(model, rt: Runtime) -> None:
    """Under pipeline parallelism, make `model` (the whole Transformer every rank builds; only its
    stage's part is trained there) the current policy on every pp rank, for the rollouts: each
    parameter is broadcast over the pp group from the stage that trains it (the embedding from the
    first, the final norm and an untied LM head from the last). Same tp rank, same shard shapes."""
    owners = [k for k, layers in enumerate(stage_layers(model.cfg, rt.pp)) for _ in layers]

    def owner(name: str) -> int:
        if name.startswith("embed_tokens."):
            return 0
        if name.startswith("layers."):
            return owners[int(name.split(".")[1])]
        return rt.pp - 1

    with torch.no_grad():
        for name, p in model.named_parameters():
            dist.broadcast(p.data, src=dist.get_global_rank(rt.groups.pp, owner(name)), group=rt.groups.pp)


def score_rollouts(trajs: list[Trajectory], tasks: list, cfg: Config, rt: Runtime) -> RewardBatch:
    """Rewards of the step's trajectories (tasks[i]: the task of trajs[i]), the same on every rank.

    Offline (exact match / F1) unless algo.judge is set. A judge is asked by global rank 0 alone, where
    exact match failed on an extracted answer, and its verdicts are broadcast: every rank must build
    the same DUPO batch, and an LLM endpoint asked twice need not answer twice alike (nor be up
    twice). A call that fails after its retries keeps the exact-match verdict (judge_fallbacks)."""
    texts, answers = [t.response for t in trajs], [[t.answer, *t.aliases] for t in tasks]
    if cfg.algo.judge is None:
        return score_batch(texts, answers, cfg.algo)
    scored = None
    if rt.rank == 0:
        async def judged() -> RewardBatch:
            async with HttpJudge(cfg.algo.judge) as judge:
                batch = await score_batch_async(texts, answers, cfg.algo, judge=judge,
                                                questions=[t.question for t in tasks])
                batch.stats["judge_retries"] = judge.stats["retries"]
                return batch
        scored = asyncio.run(judged())
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [scored]
        dist.broadcast_object_list(box, src=0)  # our own ranks' objects (pickle between trusted peers)
        scored = box[0]
    return scored


def merge_rollouts(parts: list[Rollouts]) -> Rollouts:
    """A step's rounds as one Rollouts: trajectories and scores concatenated in round order, times summed."""
    if len(parts) == 1:
        return parts[0]
    sc = [p.scored for p in parts]
    scored = RewardBatch(torch.cat([s.rewards for s in sc]), torch.cat([s.correct for s in sc]),
                         torch.cat([s.format_ok for s in sc]), [x for s in sc for x in s.scores],
                         {k: sum(s.stats.get(k, 0) for s in sc) for k in sc[0].stats})
    return Rollouts([t for p in parts for t in p.trajs], scored, sum(p.wall_s for p in parts),
                    sum(p.decode_s for p in parts), sum(p.tool_wait_s for p in parts))


class SavedRollout(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One line of out_dir/rollouts/step-NNNNNNNN.jsonl: a trajectory of the step and its score (every
    round of algo.dynamic_sampling, also groups the batch left out)."""

    step: int  # 1-based, as in metrics.jsonl
    reward: float
    correct: bool
    format_reason: str  # "ok" or the first format violation
    judged: bool  # the verdict came from algo.judge
    trajectory: Trajectory


def rollouts_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "rollouts" / f"step-{step:08d}.jsonl"


def save_rollouts(out_dir: str | Path, step: int, ro: Rollouts) -> Path:
    """Write the step's trajectories in (task, sample) order, one JSON line each, atomically (a resumed
    run rewrites the steps it repeats). Every rank holds the same `ro`: call it on one."""
    path = rollouts_path(out_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    enc = msgspec.json.Encoder()
    data = b"".join(enc.encode(SavedRollout(step, s.reward, s.correct, s.format_reason, s.judged, t)) + b"\n"
                    for t, s in zip(ro.trajs, ro.scored.scores, strict=True))
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path


def load_rollouts(out_dir: str | Path, step: int) -> list[SavedRollout]:
    """A step's saved trajectories; a malformed line is a ValueError naming the file and line."""
    return read_jsonl(rollouts_path(out_dir, step), SavedRollout)
