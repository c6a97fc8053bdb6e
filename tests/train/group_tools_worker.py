"""torchrun worker (2 ranks, gloo): `GroupTools` runs each tool call of a tp group's agent loop once, on
the group's first rank, and every rank learns at the same `ready` call that it is done, with the
leader's observation, also where the tool would have answered each rank differently (a search API
that fails on one rank only). Rank 1's tool never runs. A slow call is not ready at once and does not
hold back the fast ones (tool latency stays hidden behind decoding); `wait` blocks until one is done.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import msgspec
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1] / "parallel"))
from worker_report import report  # noqa: E402

from sailor_engine.env.protocol import FunctionTool, ToolError  # noqa: E402
from sailor_engine.env.runner import ToolLimits, ToolRunner  # noqa: E402
from sailor_engine.train.colocate import GroupTools  # noqa: E402


class Q(msgspec.Struct):
    q: str


def main() -> int:
    dist.init_process_group("gloo")
    rank, calls, release = dist.get_rank(), [], threading.Event()

    def search(args: Q) -> str:
        calls.append(args.q)
        if args.q == "slow":
            release.wait(10)
        if rank == 1 and args.q == "flaky":
            raise ToolError("provider timed out")  # what only this rank would have seen
        return f"rank {rank}: results for {args.q}"

    failures: list[str] = []
    rounds, seen = [], {}
    with ToolRunner([FunctionTool("search", search, Q, "Search.")], limits=ToolLimits(retries=0)) as runner:
        tools = GroupTools(runner, dist.new_group([0, 1]))
        queries = ["slow", "a", "flaky"]
        pending = [tools.submit("search", {"q": q}) for q in queries]
        while pending:
            done = tools.ready(pending, wait=True)
            rounds.append([queries[pending.index(f)] for f in done])
            seen.update((q, f.result().text) for q, f in zip(queries, pending) if f in done)
            queries = [q for q, f in zip(queries, pending) if f not in done]
            pending = [f for f in pending if f not in done]
            if "slow" in queries and "a" not in queries and "flaky" not in queries:
                release.set()
    if "slow" not in rounds[-1] or "slow" in rounds[0]:
        failures.append(f"rank {rank}: the slow call held back the others: {rounds}")
    everyone = [None, None]
    dist.all_gather_object(everyone, (rounds, seen))
    if everyone[0] != everyone[1]:
        failures.append(f"the ranks disagree: {everyone}")
    if seen != {q: f"rank 0: results for {q}" for q in ("slow", "a", "flaky")}:
        failures.append(f"rank {rank} saw {seen}")
    if sorted(calls) != (["a", "flaky", "slow"] if rank == 0 else []):
        failures.append(f"rank {rank}'s tool ran {calls}")
    code = report(failures, {}, ok_line="group tools ok")
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
