"""Flow control for the ToolRunner: FIFO slots, a token bucket, deadlines, an LRU cache, per-tool stats.

Small asyncio primitives, each replacing a stdlib one that was measurably slow at 10k queued calls
(see the notes on each); loop-thread only, except `Stats.snapshot`, which any thread may call.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
from typing import Any

LATENCY_WINDOW = 65_536  # latencies kept per tool for the percentiles (a ring buffer, newest kept)


class TokenBucket:
    """GCRA token bucket: each acquire reserves the next start time, so waiters need no lock."""

    def __init__(self, qps: float, burst: int):
        self.interval = 1.0 / qps
        self.tau = (burst - 1) * self.interval  # how far ahead of schedule a start may be
        self.tat = -math.inf  # theoretical arrival time of the next call

    async def acquire(self) -> None:
        now = asyncio.get_running_loop().time()
        tat = max(self.tat, now)
        self.tat = tat + self.interval
        if tat - self.tau > now:
            await asyncio.sleep(tat - self.tau - now)


class Slots:
    """A FIFO semaphore that hands a released slot straight to the next waiter.

    asyncio.Semaphore (3.11) rescans already-woken waiters on every release, which is quadratic
    with thousands of queued calls (the bench's 10k calls at concurrency 256 spent most of their
    time there). Here a release pops one waiter and completes its future: O(1).
    """

    def __init__(self, n: int):
        self.free, self.waiters = n, deque()

    async def __aenter__(self) -> None:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # the slot was handed over as we were cancelled
                self._release()
            elif fut in self.waiters:  # (a release may have popped and skipped it already)
                self.waiters.remove(fut)
            raise

    async def __aexit__(self, *exc) -> None:
        self._release()

    def _release(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1


class Deadline:
    """Cancels the current task after delay seconds, with asyncio.timeout's cancel accounting.

    asyncio.timeout is pure Python in 3.11 and was a tenth of the runner's per-call cost; this is
    the same idea with one timer handle and no state machine.
    """

    __slots__ = ("task", "cancelling", "expired", "handle")

    def __init__(self, delay: float):
        self.task = asyncio.current_task()
        self.cancelling, self.expired = self.task.cancelling(), False
        self.handle = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self.task.cancel()

    def stop(self) -> bool:
        """Disarm; True if the deadline fired (its CancelledError, if raised, is then a timeout)."""
        self.handle.cancel()
        # Undo our cancel request; if someone else cancelled too, the count stays above the start.
        return self.expired and self.task.uncancel() <= self.cancelling


class Stats:
    """Counters of one tool; mutated on the loop thread only, read from any thread."""

    def __init__(self):
        self.calls = self.ok = self.errors = self.bad_arguments = self.timeouts = 0
        self.retries = self.cache_hits = self.coalesced = self.backup_used = self.in_flight = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def snapshot(self) -> dict[str, Any]:
        lat = sorted(self.latencies)  # list(deque) is one C call: safe against the loop thread

        def pick(q: float) -> float | None:
            return lat[max(0, math.ceil(q * len(lat)) - 1)] if lat else None  # nearest rank

        out = {k: v for k, v in vars(self).items() if k != "latencies"}
        out["latency_s"] = {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99),
                            "max": lat[-1] if lat else None, "mean": sum(lat) / len(lat) if lat else None}
        return out


class LRU:
    def __init__(self, size: int):
        self.size, self.data = size, OrderedDict()

    def get(self, key):
        text = self.data.get(key)
        if text is not None:
            self.data.move_to_end(key)
        return text

    def put(self, key, text: str) -> None:
        self.data[key] = text
        self.data.move_to_end(key)
        if len(self.data) > self.size:
            self.data.popitem(last=False)
