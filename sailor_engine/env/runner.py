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

Cost: ~15 us of CPU per call on a 2-core CPU (benchmarks/bench_tools.py), so 10k calls of 10 ms at
concurrency 256 take ~1.1-1.2x the ideal 0.39 s. In a process with a large Python heap (torch),
full garbage collections triggered by the runner's task churn add ~5 us a call: call
`gc.freeze()` once the model is built.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Literal, Mapping

import msgspec

from sailor_engine.env.flow import LRU, Deadline, Slots, Stats, TokenBucket
from sailor_engine.env.protocol import Tool, ToolError, TransientToolError

ErrorKind = Literal["unknown_tool", "bad_arguments", "timeout", "transient", "error", "closed"]

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


class Observation(msgspec.Struct, frozen=True, gc=False):
    """The result of one tool call: what the model sees, and how it came about.

    Untracked by the garbage collector (gc=False): it holds only strings and numbers, so it can
    never be part of a cycle, and rollouts keep many of them alive.
    """

    tool: str  # the tool the model asked for (as written, also when unknown)
    text: str  # the tool's output, or "[tool error] <tool>: <what went wrong>"
    ok: bool  # False: text is an error message
    error_kind: ErrorKind | None = None  # None when ok
    latency_s: float = 0.0  # from the call entering the runner to its result, queueing included
    attempts: int = 0  # tool executions (retries and backup included); 0: cache hit or bad call
    cached: bool = False  # served by the cache or by an identical call in flight
    backup: str | None = None  # the backup tool that produced the text, if the primary failed


class _ToolState:
    def __init__(self, tool: Tool, limits: ToolLimits):
        self.tool, self.limits = tool, limits
        self.cacheable = bool(getattr(tool, "cacheable", True))
        self.sem = Slots(limits.concurrency)
        # Admission: at most 2x concurrency tasks per tool exist (executing, backing off or waiting
        # for a slot); further calls wait in a plain deque. 10k queued tasks would each cost a
        # task, a waiter future and a wake-up, all paid up front in one burst.
        self.admit_cap, self.admitted, self.queue = 2 * limits.concurrency, 0, deque()
        self.bucket = TokenBucket(limits.qps, limits.burst) if limits.qps else None
        self.stats = Stats()


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


class _Batch:
    """Results of a batch of calls, delivered through one future once the last one is in."""

    __slots__ = ("fut", "results", "left")

    def __init__(self, n: int):
        self.fut, self.results, self.left = concurrent.futures.Future(), [None] * n, n
        self.fut.set_running_or_notify_cancel()


def _deliver(dest: tuple[concurrent.futures.Future | _Batch, int], obs: Observation) -> None:
    target, i = dest
    if isinstance(target, _Batch):
        target.results[i] = obs
        target.left -= 1
        if target.left == 0:
            target.fut.set_result(target.results)
    elif not target.done():
        target.set_result(obs)


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
        self._cache = LRU(cache_size) if cache_size > 0 else None
        self._pending: dict[bytes, asyncio.Future | None] = {}  # identical calls in flight
        self._rng = random.Random(seed)
        self._threads = threads
        self._loop_factory = loop_factory or default_loop_factory()
        self._unknown_tool = 0
        self._lock = threading.Lock()  # guards start / close against submits from other threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        # task -> (where its observation goes, its tool's state)
        self._tasks: dict[asyncio.Task, tuple[tuple[Any, int], _ToolState | None]] = {}

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
            for state in self._tools.values():  # calls still waiting for admission never start
                while state.queue:
                    name, _, dest, _ = state.queue.popleft()
                    _deliver(dest, self._closed_obs(name))
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)
            for task in list(self._tasks):  # a tool that swallowed its cancellation
                self._settle(task, self._closed_obs(task.get_name()))
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
        """Schedule calls with one wake-up of the loop thread; one future per call, in order.

        The futures are already running: they cannot be cancelled, and always resolve.
        """
        calls = list(calls)
        futs = [concurrent.futures.Future() for _ in calls]
        for f in futs:
            f.set_running_or_notify_cancel()
        self._schedule(calls, [(f, 0) for f in futs])
        return futs

    def map(self, calls: Iterable[tuple[str, Any]], timeout: float | None = None) -> list[Observation]:
        """Run calls concurrently and return their observations in order (blocking).

        One future for the whole batch: the caller wakes once, not once per call. Not from the
        runner's own thread (it would wait on itself); raises TimeoutError if timeout expires.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("ToolRunner.map would block its own loop; use `await runner.call_many(...)`")
        return self._schedule_batch(list(calls)).result(timeout)

    async def call(self, name: str, args: Any) -> Observation:
        """One call from async code on any loop. Cancelling the caller does not cancel the call."""
        if asyncio.get_running_loop() is self._loop:
            return await self._guarded(name, args)
        return await asyncio.wrap_future(self.submit(name, args))

    async def call_many(self, calls: Iterable[tuple[str, Any]]) -> list[Observation]:
        """Many calls from async code on any loop, observations in order (one wake-up of the caller)."""
        calls = list(calls)
        if asyncio.get_running_loop() is self._loop:
            return list(await asyncio.gather(*(self._guarded(n, a) for n, a in calls)))
        return await asyncio.wrap_future(self._schedule_batch(calls))

    def _schedule_batch(self, calls: list[tuple[str, Any]]) -> concurrent.futures.Future:
        batch = _Batch(len(calls))
        if not calls:
            batch.fut.set_result([])
        self._schedule(calls, [(batch, i) for i in range(len(calls))])
        return batch.fut

    def _schedule(self, calls: list[tuple[str, Any]], dests: list[tuple[Any, int]]) -> None:
        with self._lock:  # a close() cannot slip in between: its shutdown is queued after this
            loop = self._start_locked()
            if loop is not None:
                loop.call_soon_threadsafe(self._spawn, calls, dests)
                return
        for (name, _), dest in zip(calls, dests):
            _deliver(dest, self._closed_obs(name))

    def _spawn(self, calls: list[tuple[str, Any]], dests: list[tuple[Any, int]]) -> None:
        t0 = time.perf_counter()  # latency counts from here, time waiting for admission included
        for (name, args), dest in zip(calls, dests):
            state = self._tools.get(name) if isinstance(name, str) else None
            if state is not None and state.admitted >= state.admit_cap:
                state.queue.append((name, args, dest, t0))
            else:
                self._start_task(name, args, dest, t0, state)

    def _start_task(self, name: Any, args: Any, dest: tuple[Any, int], t0: float, state: _ToolState | None) -> None:
        task = asyncio.get_running_loop().create_task(self._guarded(name, args, t0),
                                                      name=name if isinstance(name, str) else "?")
        if state is not None:
            state.admitted += 1
        self._tasks[task] = (dest, state)
        task.add_done_callback(self._settle)

    def _settle(self, task: asyncio.Task, obs: Observation | None = None) -> None:
        entry = self._tasks.pop(task, None)
        if entry is None:
            return
        dest, state = entry
        if obs is None:
            if task.cancelled():
                obs = self._closed_obs(task.get_name())
            elif (exc := task.exception()) is not None:  # a bug in the runner itself: still an observation
                obs = Observation(task.get_name(), f"[tool error] internal error: {type(exc).__name__}: {exc}",
                                  False, "error")
            else:
                obs = task.result()
        _deliver(dest, obs)
        if state is not None:
            state.admitted -= 1
            if state.queue and not self._closed:
                self._start_task(*state.queue.popleft(), state)

    async def _guarded(self, name: Any, args: Any, t0: float | None = None) -> Observation:
        if self._closed:
            return self._closed_obs(name)
        try:
            return await self._call(name, args, allow_backup=True, t0=t0)
        except asyncio.CancelledError:
            if self._closed:  # cancelled by close(): the caller gets an observation, not an exception
                return self._closed_obs(name)
            raise

    @staticmethod
    def _closed_obs(name: Any) -> Observation:
        name = name if isinstance(name, str) else repr(name)
        return Observation(name, f"[tool error] {name}: tool runner closed", False, "closed")

    # -- one call --------------------------------------------------------------------------------

    async def _call(self, name: Any, args: Any, *, allow_backup: bool, t0: float | None = None) -> Observation:
        t0 = time.perf_counter() if t0 is None else t0
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
            # bytes, not a (name, json) tuple: the garbage collector does not track bytes, and a full
            # cache of tuples made its passes over the trainer's heap visibly longer.
            key = name.encode() + b"\0" + msgspec.json.encode(parsed, order="deterministic")
            text = self._cache.get(key)
            if text is not None:
                stats.cache_hits += 1
                return Observation(name, text, True, None, time.perf_counter() - t0, 0, True)
            while key in self._pending:  # join the identical call in flight
                leader = self._pending[key]
                if leader is None:  # the first follower makes the future the leader will complete
                    leader = self._pending[key] = asyncio.get_running_loop().create_future()
                obs = await asyncio.shield(leader)
                if obs is not None:  # None: the leader was cancelled, so run it ourselves
                    stats.coalesced += 1
                    return msgspec.structs.replace(obs, latency_s=time.perf_counter() - t0, attempts=0, cached=True)
            self._pending[key] = None
        obs = None
        try:
            text, kind, msg, attempts = await self._attempts(state, parsed)
            served_by = cached = None
            if kind is not None and allow_backup and name in self._backups:
                text, kind, msg, attempts, served_by, cached = await self._backup(name, args, kind, msg, attempts)
            latency = time.perf_counter() - t0
            stats.latencies.append(latency)
            if kind is None:
                stats.ok += 1
                obs = Observation(name, text, True, None, latency, attempts, bool(cached), served_by)
                if key is not None and served_by is None:
                    self._cache.put(key, text)
            else:
                stats.errors += 1
                obs = Observation(name, f"[tool error] {name}: {_clip(msg)}", False, kind, latency, attempts)
            return obs
        finally:
            if key is not None and (followers := self._pending.pop(key)) is not None:
                followers.set_result(obs)

    async def _backup(self, name: str, raw_args: Any, kind: ErrorKind, msg: str, attempts: int) -> tuple:
        """The backup tool on the same arguments, with its own limits, cache and retries."""
        backup = self._backups[name]
        bobs = await self._call(backup, raw_args, allow_backup=False)
        attempts += bobs.attempts
        if bobs.ok:
            self._tools[name].stats.backup_used += 1
            return bobs.text, None, "", attempts, backup, bobs.cached
        why = bobs.text.removeprefix(f"[tool error] {backup}: ")
        return None, kind, f"{msg}; backup {backup} failed: {why}", attempts, None, False

    def _bad_args(self, name: str, stats: Stats, msg: str, t0: float) -> Observation:
        stats.bad_arguments += 1
        stats.errors += 1
        return Observation(name, f"[tool error] {name}: bad arguments: {_clip(msg)}", False, "bad_arguments",
                           time.perf_counter() - t0)

    async def _attempts(self, state: _ToolState, args: msgspec.Struct) -> tuple[str | None, ErrorKind | None, str, int]:
        """Run the tool, retrying transient failures: (text, error kind, error message, attempts)."""
        limits, stats = state.limits, state.stats
        for attempt in range(limits.retries + 1):
            if attempt:
                stats.retries += 1
                await asyncio.sleep(self._backoff(limits, attempt))
            async with state.sem:
                if state.bucket is not None:
                    await state.bucket.acquire()
                stats.in_flight += 1
                transient = False
                deadline = Deadline(limits.timeout_s)
                try:
                    try:
                        text = await state.tool(args)
                    finally:
                        expired = deadline.stop()
                except asyncio.CancelledError:
                    if not expired:
                        raise  # cancelled from outside (close), not by the deadline
                    stats.timeouts += 1
                    kind, msg, transient = "timeout", f"timeout after {limits.timeout_s:g}s", True
                except TimeoutError as e:  # the tool's own (e.g. a client-side timeout)
                    stats.timeouts += 1
                    kind, msg, transient = "timeout", f"timeout: {e or type(e).__name__}", True
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

    def _backoff(self, limits: ToolLimits, attempt: int) -> float:
        """Delay before retry `attempt` (1-based): exponential, capped, jittered down by the seeded rng."""
        delay = min(limits.backoff_max_s, limits.backoff_s * 2 ** (attempt - 1))
        return delay * (1.0 - limits.jitter * self._rng.random())

    # -- metrics ---------------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """Per-tool counters and latency percentiles (seconds, over the last 65536 executed calls).

        calls: every call naming the tool, = ok + errors + cache_hits + coalesced once all are done
        (errors include bad_arguments); timeouts and retries count attempts; in_flight: executing
        now; queued: waiting for a slot.
        """
        loop = self._loop
        return {
            "loop": type(loop).__module__.split(".")[0] if loop is not None else None,
            "closed": self._closed,
            "unknown_tool": self._unknown_tool,
            "cache_entries": len(self._cache.data) if self._cache is not None else 0,
            "tools": {name: {**s.stats.snapshot(), "queued": len(s.queue) + len(s.sem.waiters)}
                      for name, s in self._tools.items()},
        }
