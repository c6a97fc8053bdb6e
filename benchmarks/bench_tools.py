"""ToolRunner throughput: N calls of a tool with fixed simulated latency at a concurrency limit.

The ideal wall time is latency x calls / concurrency (every slot always busy, zero overhead); the
runner's overhead per call (argument validation, cache lookup, semaphore, timeout, metrics, the
hop from the caller's thread) shows up as the ratio to it (target <= 1.2x at 10k calls of 10 ms,
concurrency 256). Measured for the runner's uvloop loop and for asyncio's default loop, each from
synchronous code (`map`: one future for the batch; `submit_many`: one future per call, as an agent
loop that polls episodes uses it) and from async code on the caller's own loop (`await call_many`).
"bare tasks" is the floor on this machine: one task per call sleeping the latency, nothing else.
cpu_us_per_call: process CPU time (both threads) per call, the number that stays put when the
machine is shared and wall times wander.

Each is run twice: gc "live" is this process as it is (torch imported: ~165k objects that every
full garbage collection walks, and the runner's tasks trigger some), gc "frozen" after
`gc.freeze()`, as a trainer would call once its model is built (vLLM does the same after start-up).

    python benchmarks/bench_tools.py [--calls 10000] [--latency-ms 10] [--concurrency 256] [--reps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import itertools
import time
import sys
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, record, time_fn  # noqa: E402

from sailor_engine.env.runner import ToolLimits, ToolRunner, default_loop_factory  # noqa: E402


class Query(msgspec.Struct):
    query: list[str]


class Sleepy:
    """A tool that answers after a fixed latency, like a provider with a constant response time."""

    name, description, args_type = "search", "simulated search", Query

    def __init__(self, latency_s: float):
        self.latency_s = latency_s

    async def __call__(self, args: Query) -> str:
        await asyncio.sleep(self.latency_s)
        return args.query[0]


async def bare_tasks(calls: int, latency_s: float, concurrency: int) -> None:
    """The floor: one asyncio task per call, at most `concurrency` alive, nothing else."""
    loop = asyncio.get_running_loop()
    done, left, started = loop.create_future(), [calls], [0]

    def start() -> None:
        started[0] += 1
        loop.create_task(asyncio.sleep(latency_s)).add_done_callback(finish)

    def finish(_) -> None:
        left[0] -= 1
        if started[0] < calls:
            start()
        elif left[0] == 0:
            done.set_result(None)

    for _ in range(min(concurrency, calls)):
        start()
    await done


def bench_floor(loop_name: str, args: argparse.Namespace) -> dict:
    factory = default_loop_factory() if loop_name == "uvloop" else asyncio.new_event_loop
    loop = factory()
    try:
        run = lambda: loop.run_until_complete(bare_tasks(args.calls, args.latency_ms / 1e3, args.concurrency))  # noqa: E731
        cpu0 = time.process_time()
        t = time_fn(run, "cpu", warmup=1, reps=args.reps)
        cpu_us = (time.process_time() - cpu0) / ((args.reps + 1) * args.calls) * 1e6
    finally:
        loop.close()
    ideal_ms = args.latency_ms * args.calls / args.concurrency
    return {"loop": loop_name, "caller": "bare tasks", **t, "ideal_ms": ideal_ms, "x_ideal": t["median_ms"] / ideal_ms,
            "calls_per_s": args.calls / (t["median_ms"] / 1e3), "cpu_us_per_call": cpu_us}


def bench(loop_name: str, caller: str, args: argparse.Namespace) -> dict:
    factory = default_loop_factory() if loop_name == "uvloop" else asyncio.new_event_loop
    if loop_name == "uvloop" and factory is asyncio.new_event_loop:
        raise SystemExit("uvloop is not installed")
    limits = ToolLimits(concurrency=args.concurrency, timeout_s=10 * args.latency_ms / 1e3 + 1)
    reps = itertools.count()

    def fresh() -> list:
        # Distinct arguments every rep: the cache must miss, not serve. Built inside the timed call
        # (~1% of it): prebuilding every rep's list up front grows the heap, and the garbage
        # collector's full passes over it then cost more than the runner itself.
        rep = next(reps)
        return [("search", f'{{"query": ["q{rep}-{i}"]}}') for i in range(args.calls)]  # JSON, as the model writes it

    with ToolRunner([Sleepy(args.latency_ms / 1e3)], limits=limits, loop_factory=factory) as runner:
        if caller == "map":  # sync, one future for the batch
            def run():
                obs = runner.map(fresh())
                assert all(o.ok for o in obs)
        elif caller == "submit_many":  # sync, one future per call (an agent loop polling each episode)
            def run():
                futs = runner.submit_many(fresh())
                concurrent.futures.wait(futs)
                assert all(f.result().ok for f in futs)
        else:  # async code on its own loop
            async def many():
                obs = await runner.call_many(fresh())
                assert all(o.ok for o in obs)

            def run():
                asyncio.run(many())
        cpu0 = time.process_time()
        t = time_fn(run, "cpu", warmup=1, reps=args.reps)
        cpu_us = (time.process_time() - cpu0) / ((args.reps + 1) * args.calls) * 1e6
        m = runner.metrics()["tools"]["search"]
    ideal_ms = args.latency_ms * args.calls / args.concurrency
    assert m["calls"] == m["ok"] == args.calls * (args.reps + 1)
    return {"loop": loop_name, "caller": caller, **t, "ideal_ms": ideal_ms, "x_ideal": t["median_ms"] / ideal_ms,
            "calls_per_s": args.calls / (t["median_ms"] / 1e3), "cpu_us_per_call": cpu_us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--latency-ms", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for heap in ("live", "frozen"):
        if heap == "frozen":
            gc.freeze()  # what a trainer does once its model is built: full GC passes skip that heap
        for loop in ("uvloop", "asyncio"):
            rows.append({"gc": heap, **bench_floor(loop, args)})
            rows += [{"gc": heap, **bench(loop, caller, args)} for caller in ("map", "submit_many", "async")]
    gc.unfreeze()
    title = (f"ToolRunner: {args.calls} calls x {args.latency_ms:g} ms at concurrency {args.concurrency} "
             f"(ideal {rows[0]['ideal_ms']:.0f} ms; target <= 1.2x)")
    columns = ["gc", "loop", "caller", "median_ms", "p20_ms", "p80_ms", "x_ideal", "calls_per_s", "cpu_us_per_call"]
    print_table(title, rows, columns)
    record("bench_tools", vars(args), rows, "cpu")


if __name__ == "__main__":
    main()
