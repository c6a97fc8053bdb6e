"""Colocated rollouts over a torchrun layout: which episodes a rank runs, and the tools of a tp group.

    lo, hi = block(len(tasks), rt.dp, rt.dp_rank)                     # this rank's share of the tasks
    runner = GroupTools(runner, rt.groups.tp) if rt.tp > 1 else runner  # one agent loop over tp ranks

The ranks of a tp group hold shards of one model and must run every generator forward together, on
the same batch. An agent loop's batches follow tool timing (an episode resumes once its call is
done), and tools are not deterministic either (a search API times out on one rank and not on
another, or ranks its results differently): ranks left to their own runners would extend their
episodes differently and the next tensor-parallel forward would hang or mix tokens. With
`GroupTools` the group's first rank alone runs the tool calls, and at every turn of the loop it
decides which calls are done and broadcasts their observations (`ready`): every rank sees the same
observations at the same step, while tool latency still hides behind decoding as in one process.
A rate-limited API is also called tp times less often. Used by the RL loop and by eval.
"""

from __future__ import annotations

import concurrent.futures

import msgspec
import torch.distributed as dist

from sailor_engine.env.runner import Observation
from sailor_engine.rollout.agent import done_indices


def block(n: int, parts: int, i: int) -> tuple[int, int]:
    """[lo, hi) of part i when n items are cut into `parts` contiguous blocks (the first n % parts one longer)."""
    size, extra = divmod(n, parts)
    lo = i * size + min(i, extra)
    return lo, lo + size + (i < extra)


class GroupTools:
    """The tool runner of one agent loop run by every rank of a process group (see the module docstring).

    Every rank must make the same submit and ready calls in the same order: the agent loop does, as
    long as its generator's output is the same on every rank (tensor parallelism)."""

    def __init__(self, runner, group: dist.ProcessGroup):
        self.runner, self.tools, self.group = runner, runner.tools, group
        self.src = dist.get_global_rank(group, 0)
        self.leads = dist.get_rank() == self.src

    def submit(self, name: str, args) -> concurrent.futures.Future:
        """The leader's call; elsewhere a future that `ready` resolves with the leader's observation."""
        if self.leads:
            return self.runner.submit(name, args)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_running_or_notify_cancel()
        return fut

    def ready(self, futures: list[concurrent.futures.Future], wait: bool) -> list[concurrent.futures.Future]:
        """Those of `futures` (this rank's, in submission order) the leader finds done, at least one
        with `wait`; one broadcast of their observations. Collective over the group."""
        if self.leads:
            done = [(i, futures[i].result()) for i in done_indices(futures, wait)]  # never raises
            box = [msgspec.json.encode(done)]
        else:
            box = [None]
        dist.broadcast_object_list(box, src=self.src, group=self.group)  # bytes, between our own ranks
        if not self.leads:
            done = msgspec.json.decode(box[0], type=list[tuple[int, Observation]])
            for i, obs in done:
                futures[i].set_result(obs)
        return [futures[i] for i, _ in done]
