"""Colocated rollouts over a torchrun layout: which episodes a rank runs, and a tool runner for tp groups.

    lo, hi = block(len(tasks), rt.dp, rt.dp_rank)      # this dp rank's contiguous share of the tasks
    runner = Lockstep(runner) if rt.tp > 1 else runner  # tp ranks must run the same generator batches

The ranks of a tp group hold shards of one model and must run every generator forward in lockstep,
but an agent loop's batches follow tool timing (an episode resumes when its tool call is done), which
differs between processes. With `Lockstep` every tool call completes before submit returns, so the
schedule is a function of the episodes alone, at the cost of not hiding tool latency behind decoding.
Used by the RL loop and by eval.
"""

from __future__ import annotations


def block(n: int, parts: int, i: int) -> tuple[int, int]:
    """[lo, hi) of part i when n items are cut into `parts` contiguous blocks (the first n % parts one longer)."""
    size, extra = divmod(n, parts)
    lo = i * size + min(i, extra)
    return lo, lo + size + (i < extra)


class Lockstep:
    """A ToolRunner whose submit returns a finished future (see the module docstring)."""

    def __init__(self, runner):
        self.runner, self.tools = runner, runner.tools

    def submit(self, name: str, args):
        fut = self.runner.submit(name, args)
        fut.result()  # the runner never raises: failures come back as observations
        return fut
