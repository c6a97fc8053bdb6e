"""ToolRunner: runs tool calls concurrently on a private uvloop thread, never raising into the caller.

Rollouts park an episode on each tool call and keep decoding the others, so tool calls must run
concurrently with the trainer's Python thread, bounded per tool, and come back as text the
policy can read whatever happens. Each call goes through, in order:

    unknown tool?  -> error observation
    decode + validate the arguments with the tool's msgspec schema -> error observation if bad
    LRU cache keyed on (tool, canonical args JSON); an identical call already in flight is joined
    per-tool concurrency slot (semaphore) -> QPS token (GCRA token bucket) -> call under a timeout
    transient failure (timeout, ConnectionError, TransientToolError): retry with exponential
        backoff and seeded jitter; other failures are not retried
    still failing: the backup tool, if one is configured (`backups={"search": "search_backup"}`)

and ends as an `Observation`: the text the model sees (`[tool error] visit: timeout after 10s` on
failure) plus what happened. From synchronous code (the agent loop):

    with ToolRunner([search, visit, PythonTool()], limits=ToolLimits(timeout_s=10),
                    per_tool={"python": ToolLimits(concurrency=4, retries=0, timeout_s=30)}) as runner:
        fut = runner.submit("search", '{"query": ["Sailor Fog"]}')     # concurrent.futures.Future
        obs = fut.result()                                              # never an exception
        many = runner.map([("visit", {"url": ["..."], "goal": "..."}), ...])
        runner.metrics()["tools"]["search"]["latency_s"]["p99"]

and from async code on any loop: `obs = await runner.call("search", {"query": ["..."]})`.

The loop thread starts on first use (or `with`); `close()` is idempotent, cancels calls in flight
(their futures resolve to `[tool error] <tool>: tool runner closed`), closes tools with `aclose`,
and joins the thread. Limits are per tool: the per-call timeout bounds one attempt's execution,
not time spent queued for a slot or a QPS token. Jitter is drawn from one seeded generator, so
backoff delays are reproducible for a given order of failures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import random
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable, Literal, Mapping

import msgspec

from sailor_engine.env.protocol import Tool, ToolError, TransientToolError

ErrorKind = Literal["unknown_tool", "bad_arguments", "timeout", "transient", "error", "closed"]

_LATENCY_WINDOW = 65_536  # latencies kept per tool for the percentiles (a ring buffer, newest kept)
_MAX_MESSAGE = 500  # characters of an error message shown to the model (exception texts can be huge)


class ToolLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Limits of one tool (or the default for every tool)."""

    concurrency: int = 64  # calls of this tool executing at once
    qps: float | None = None  # calls started per second (token bucket); None: unlimited
    burst: int = 1  # calls the bucket lets start back to back after an idle period
    timeout_s: float = 10.0  # wall-clock limit of one attempt
    retries: int = 2  # extra attempts after a transient failure
    backoff_s: float = 0.5  # delay before the first retry; doubles each retry (then jittered down)
    backoff_max_s: float = 8.0  # cap of the delay before jitter
    jitter: float = 0.5  # delay *= 1 - jitter * U[0, 1): spreads retries of calls that failed together

    def __post_init__(self):
        if self.concurrency < 1 or self.burst < 1 or self.retries < 0:
            raise ValueError(f"concurrency and burst must be >= 1 and retries >= 0, got {self}")
        if self.timeout_s <= 0 or (self.qps is not None and self.qps <= 0):
            raise ValueError(f"timeout_s and qps must be > 0, got {self}")
        if self.backoff_s < 0 or self.backoff_max_s < 0 or not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff_s, backoff_max_s must be >= 0 and jitter in [0, 1], got {self}")


class Observation(msgspec.Struct, frozen=True):
    """The result of one tool call: what the model sees, and how it came about."""

    tool: str  # the tool the model asked for (as written, also when unknown)
    text: str  # the tool's output, or "[tool error] <tool>: <what went wrong>"
    ok: bool  # False: text is an error message
    error_kind: ErrorKind | None = None  # None when ok
    latency_s: float = 0.0  # from the call entering the runner to its result, queueing included
    attempts: int = 0  # tool executions (retries and backup included); 0: cache hit or bad call
    cached: bool = False  # served by the cache or by an identical call in flight
    backup: str | None = None  # the backup tool that produced the text, if the primary failed


class _TokenBucket:
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


class _Stats:
    """Counters of one tool; mutated on the loop thread only, read from any thread."""

    def __init__(self):
        self.calls = self.ok = self.errors = self.bad_arguments = self.timeouts = 0
        self.retries = self.cache_hits = self.coalesced = self.backup_used = self.in_flight = 0
        self.latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)

    def snapshot(self) -> dict[str, Any]:
        lat = sorted(self.latencies)  # list(deque) is one C call: safe against the loop thread

        def pick(q: float) -> float | None:
            return lat[max(0, math.ceil(q * len(lat)) - 1)] if lat else None  # nearest rank

        out = {k: v for k, v in vars(self).items() if k != "latencies"}
        out["latency_s"] = {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99),
                            "max": lat[-1] if lat else None, "mean": sum(lat) / len(lat) if lat else None}
        return out


class _ToolState:
    def __init__(self, tool: Tool, limits: ToolLimits):
        self.tool, self.limits = tool, limits
        self.cacheable = bool(getattr(tool, "cacheable", True))
        self.sem = asyncio.Semaphore(limits.concurrency)  # binds to the loop on first use
        self.bucket = _TokenBucket(limits.qps, limits.burst) if limits.qps else None
        self.stats = _Stats()


class _LRU:
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


def default_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when importable, else asyncio's default loop (detected once, at runner creation)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def _check_tool(tool: Any) -> None:
    for attr in ("name", "description", "args_type"):
        if not hasattr(tool, attr):
            raise TypeError(f"tool {tool!r} has no {attr!r} (see sailor_engine.env.protocol.Tool)")
    if not (isinstance(tool.args_type, type) and issubclass(tool.args_type, msgspec.Struct)):
        raise TypeError(f"tool {tool.name!r}: args_type must be a msgspec.Struct subclass, got {tool.args_type!r}")
    if not callable(tool):
        raise TypeError(f"tool {tool.name!r} is not callable")


def _decode(args: Any, args_type: type[msgspec.Struct]) -> msgspec.Struct:
    """JSON text/bytes, a dict or an args_type instance -> a validated args_type instance."""
    if isinstance(args, args_type):
        return args
    if isinstance(args, (str, bytes, bytearray, memoryview)):
        return msgspec.json.decode(args, type=args_type)
    return msgspec.convert(args, args_type)


def _clip(msg: str) -> str:
    return msg if len(msg) <= _MAX_MESSAGE else msg[:_MAX_MESSAGE] + f"... [{len(msg) - _MAX_MESSAGE} more chars]"


class ToolRunner:
    """Concurrent, bounded, never-raising tool execution; see the module docstring."""

    def __init__(self, tools: Iterable[Tool], *, limits: ToolLimits = ToolLimits(),
                 per_tool: Mapping[str, ToolLimits] | None = None, backups: Mapping[str, str] | None = None,
                 cache_size: int = 10_000, seed: int = 0, threads: int = 32,
                 loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None):
        tools = list(tools)
        for tool in tools:
            _check_tool(tool)
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        per_tool, backups = dict(per_tool or {}), dict(backups or {})
        for what, keys in (("per_tool", per_tool), ("backups", [*backups, *backups.values()])):
            unknown = sorted(set(keys) - set(names))
            if unknown:
                raise ValueError(f"{what} names unknown tools {unknown} (tools: {sorted(names)})")
        if any(k == v for k, v in backups.items()):
            raise ValueError(f"a tool cannot be its own backup: {backups}")
        self._tools = {t.name: _ToolState(t, per_tool.get(t.name, limits)) for t in tools}
        self._available = ", ".join(sorted(names))
        self._backups = backups
        self._cache = _LRU(cache_size) if cache_size > 0 else None
        self._pending: dict[tuple[str, bytes], asyncio.Future] = {}  # identical calls in flight
        self._rng = random.Random(seed)
        self._threads = threads
        self._loop_factory = loop_factory or default_loop_factory()
        self._unknown_tool = 0
        self._lock = threading.Lock()  # guards start / close against submits from other threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        self._tasks: dict[asyncio.Task, concurrent.futures.Future | None] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> ToolRunner:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> ToolRunner:
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    @property
    def tools(self) -> dict[str, Tool]:
        return {name: s.tool for name, s in self._tools.items()}

    def start(self) -> None:
        """Start the loop thread now (otherwise the first call does). No-op once started or closed."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> asyncio.AbstractEventLoop | None:
        if self._closed:
            return None
        if self._loop is None:
            ready = threading.Event()
            self._thread = threading.Thread(target=self._run_loop, args=(ready,), name="tool-runner", daemon=True)
            self._thread.start()
            ready.wait()
        return self._loop

    def _run_loop(self, ready: threading.Event) -> None:
        loop = self._loop_factory()
        asyncio.set_event_loop(loop)
        self._executor = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="tool-runner-fn")
        loop.set_default_executor(self._executor)
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def close(self, timeout: float = 5.0) -> None:
        """Cancel calls in flight (they resolve to 'runner closed'), close tools, join the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None:
            return
        # Scheduled after every submit that got through the lock, so their tasks exist by then.
        loop.call_soon_threadsafe(lambda: loop.create_task(self._shutdown(timeout)))
        if threading.current_thread() is not thread:
            thread.join(timeout + 2.0)

    async def aclose(self, timeout: float = 5.0) -> None:
        """close() for async code: joins the thread without blocking the caller's loop."""
        if asyncio.get_running_loop() is self._loop:
            self.close(timeout)  # cannot join our own thread; shutdown proceeds on this loop
        else:
            await asyncio.to_thread(self.close, timeout)

    async def _shutdown(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)
            for task, fut in list(self._tasks.items()):  # a tool that swallowed its cancellation
                if fut is not None and not fut.done():
                    fut.set_result(self._closed_obs(task.get_name()))
            for state in self._tools.values():
                aclose = getattr(state.tool, "aclose", None)
                if aclose is not None:
                    try:
                        await asyncio.wait_for(aclose(), timeout)
                    except Exception:  # noqa: BLE001 - a tool that fails to close must not stop the others
                        pass
        finally:
            # A sync tool hung in its thread cannot be interrupted; do not wait for it.
            self._executor.shutdown(wait=False, cancel_futures=True)
            loop.stop()

    # -- calling ---------------------------------------------------------------------------------

    def submit(self, name: str, args: Any) -> concurrent.futures.Future:
        """Schedule one call from any thread; the future always resolves to an Observation."""
        return self.submit_many([(name, args)])[0]

    def submit_many(self, calls: Iterable[tuple[str, Any]]) -> list[concurrent.futures.Future]:
        """Schedule many calls with one wake-up of the loop thread; futures in the order of calls."""
        calls = list(calls)
        futs = [concurrent.futures.Future() for _ in calls]
        with self._lock:
            loop = self._start_locked()
            if loop is not None:
                loop.call_soon_threadsafe(self._spawn, calls, futs)
                return futs
        for (name, _), fut in zip(calls, futs):
            fut.set_result(self._closed_obs(name))
        return futs

    def map(self, calls: Iterable[tuple[str, Any]], timeout: float | None = None) -> list[Observation]:
        """Run calls concurrently and wait for all of them (blocking; not from the runner's thread)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("ToolRunner.map would block its own loop; use `await runner.call(...)`")
        return [f.result(timeout) for f in self.submit_many(calls)]

    async def call(self, name: str, args: Any) -> Observation:
        """One call from async code on any loop. Cancelling the caller does not cancel the call."""
        if asyncio.get_running_loop() is self._loop:
            return await self._guarded(name, args)
        return await asyncio.wrap_future(self.submit(name, args))

    async def call_many(self, calls: Iterable[tuple[str, Any]]) -> list[Observation]:
        if asyncio.get_running_loop() is self._loop:
            return list(await asyncio.gather(*(self._guarded(n, a) for n, a in calls)))
        return list(await asyncio.gather(*map(asyncio.wrap_future, self.submit_many(calls))))

    def _spawn(self, calls: list[tuple[str, Any]], futs: list[concurrent.futures.Future]) -> None:
        loop = asyncio.get_running_loop()
        for (name, args), fut in zip(calls, futs):
            fut.set_running_or_notify_cancel()  # from here on the future cannot be cancelled
            task = loop.create_task(self._guarded(name, args), name=name if isinstance(name, str) else "?")
            self._tasks[task] = fut
            task.add_done_callback(self._settle)

    def _settle(self, task: asyncio.Task) -> None:
        fut = self._tasks.pop(task, None)
        if fut is None or fut.done():
            return
        if task.cancelled():
            fut.set_result(self._closed_obs(task.get_name()))
        elif task.exception() is not None:  # a bug in the runner itself; still an observation
            exc = task.exception()
            fut.set_result(Observation(task.get_name(), f"[tool error] internal error: {type(exc).__name__}: {exc}",
                                       False, "error"))
        else:
            fut.set_result(task.result())

    async def _guarded(self, name: Any, args: Any) -> Observation:
        if self._closed:
            return self._closed_obs(name)
        try:
            return await self._call(name, args, allow_backup=True)
        except asyncio.CancelledError:
            if self._closed:  # cancelled by close(): the caller gets an observation, not an exception
                return self._closed_obs(name)
            raise

    @staticmethod
    def _closed_obs(name: Any) -> Observation:
        name = name if isinstance(name, str) else repr(name)
        return Observation(name, f"[tool error] {name}: tool runner closed", False, "closed")

    # -- one call --------------------------------------------------------------------------------

    async def _call(self, name: Any, args: Any, *, allow_backup: bool) -> Observation:
        t0 = time.perf_counter()
        state = self._tools.get(name) if isinstance(name, str) else None
        if state is None:
            self._unknown_tool += 1
            shown = _clip(repr(name) if not isinstance(name, str) or len(name) <= 64 else repr(name[:64] + "..."))
            return Observation(str(name)[:64], f"[tool error] unknown tool {shown} (available: {self._available})",
                               False, "unknown_tool", time.perf_counter() - t0)
        stats = state.stats
        stats.calls += 1
        try:
            parsed = _decode(args, state.tool.args_type)
        except msgspec.ValidationError as e:
            return self._bad_args(name, stats, str(e), t0)
        except msgspec.DecodeError as e:
            return self._bad_args(name, stats, f"malformed JSON: {e}", t0)
        except Exception as e:  # noqa: BLE001 - arbitrary caller input must not escape as an exception
            return self._bad_args(name, stats, f"{type(e).__name__}: {e}", t0)

        key = None
        if state.cacheable and self._cache is not None:
            key = (name, msgspec.json.encode(parsed, order="deterministic"))
            text = self._cache.get(key)
            if text is not None:
                stats.cache_hits += 1
                return Observation(name, text, True, None, time.perf_counter() - t0, 0, True)
            while (leader := self._pending.get(key)) is not None:  # join the identical call in flight
                obs = await asyncio.shield(leader)
                if obs is not None:  # None: the leader was cancelled, so run it ourselves
                    stats.coalesced += 1
                    return msgspec.structs.replace(obs, latency_s=time.perf_counter() - t0, attempts=0, cached=True)
            self._pending[key] = asyncio.get_running_loop().create_future()
        obs = None
        try:
            obs = await self._execute(name, state, parsed, args, allow_backup, t0)
            if key is not None and obs.ok and obs.backup is None:
                self._cache.put(key, obs.text)
            return obs
        finally:
            if key is not None:
                self._pending.pop(key).set_result(obs)

    def _bad_args(self, name: str, stats: _Stats, msg: str, t0: float) -> Observation:
        stats.bad_arguments += 1
        stats.errors += 1
        return Observation(name, f"[tool error] {name}: bad arguments: {_clip(msg)}", False, "bad_arguments",
                           time.perf_counter() - t0)

    async def _execute(self, name: str, state: _ToolState, parsed: msgspec.Struct, raw_args: Any,
                       allow_backup: bool, t0: float) -> Observation:
        stats = state.stats
        text, kind, msg, attempts = await self._attempts(state, parsed)
        served_by, cached = None, False
        if kind is not None and allow_backup and name in self._backups:
            backup = self._backups[name]
            bobs = await self._call(backup, raw_args, allow_backup=False)  # its own limits, cache, retries
            attempts += bobs.attempts
            if bobs.ok:
                stats.backup_used += 1
                text, kind, served_by, cached = bobs.text, None, backup, bobs.cached
            else:
                msg = f"{msg}; backup {backup} failed: {bobs.text.removeprefix(f'[tool error] {backup}: ')}"
        latency = time.perf_counter() - t0
        stats.latencies.append(latency)
        if kind is None:
            stats.ok += 1
            return Observation(name, text, True, None, latency, attempts, cached, served_by)
        stats.errors += 1
        return Observation(name, f"[tool error] {name}: {_clip(msg)}", False, kind, latency, attempts)

    async def _attempts(self, state: _ToolState, args: msgspec.Struct) -> tuple[str | None, ErrorKind | None, str, int]:
        """Run the tool, retrying transient failures: (text, error kind, error message, attempts)."""
        limits, stats = state.limits, state.stats
        for attempt in range(limits.retries + 1):
            if attempt:
                stats.retries += 1
                delay = min(limits.backoff_max_s, limits.backoff_s * 2 ** (attempt - 1))
                await asyncio.sleep(delay * (1.0 - limits.jitter * self._rng.random()))
            async with state.sem:
                if state.bucket is not None:
                    await state.bucket.acquire()
                stats.in_flight += 1
                transient = False
                try:
                    async with asyncio.timeout(limits.timeout_s) as deadline:
                        text = await state.tool(args)
                except TimeoutError as e:  # ours (deadline expired) or the tool's own
                    stats.timeouts += 1
                    kind, transient = "timeout", True
                    msg = f"timeout after {limits.timeout_s:g}s" if deadline.expired() else f"timeout: {e}"
                except TransientToolError as e:
                    kind, msg, transient = "transient", str(e) or type(e).__name__, True
                except ToolError as e:
                    kind, msg = "error", str(e) or type(e).__name__
                except ConnectionError as e:
                    kind, msg, transient = "transient", f"{type(e).__name__}: {e}", True
                except Exception as e:  # noqa: BLE001 - a buggy tool must not take the rollout down
                    kind, msg = "error", f"{type(e).__name__}: {e}"
                else:
                    if isinstance(text, str):
                        return text, None, "", attempt + 1
                    kind, msg = "error", f"tool returned {type(text).__name__}, expected str"
                finally:
                    stats.in_flight -= 1
            if not transient:
                break
        return None, kind, msg, attempt + 1

    # -- metrics ---------------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """Per-tool counters and latency percentiles (seconds, over the last 65536 executed calls).

        calls: every call naming the tool; ok / errors: their outcomes (cache hits count as ok only
        in cache_hits / coalesced); timeouts and retries count attempts; in_flight: executing now.
        """
        loop = self._loop
        return {
            "loop": type(loop).__module__.split(".")[0] if loop is not None else None,
            "closed": self._closed,
            "unknown_tool": self._unknown_tool,
            "cache_entries": len(self._cache.data) if self._cache is not None else 0,
            "tools": {name: s.stats.snapshot() for name, s in self._tools.items()},
        }
