"""ToolRunner: load with hanging calls, QPS, retries, backup, cache, error observations, fuzzing, lifecycle."""

import asyncio
import math
import threading
import time

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sailor_engine.env.protocol import FunctionTool, Tool, ToolError, TransientToolError, tool_spec
from sailor_engine.env.flow import Slots
from sailor_engine.env.runner import Observation, ToolLimits, ToolRunner


class Query(msgspec.Struct, forbid_unknown_fields=True):
    query: list[str]


class Key(msgspec.Struct):
    key: int


class Script:
    """A tool whose behaviour per call is scripted by its arguments; records what happened."""

    args_type = Key
    description = "scripted test tool"

    def __init__(self, name, behave, *, cacheable=True):
        self.name, self.behave, self.cacheable = name, behave, cacheable
        self.calls, self.cancelled, self.starts = [], 0, []

    async def __call__(self, args):
        self.calls.append(args.key)
        self.starts.append(asyncio.get_running_loop().time())
        try:
            return await self.behave(args.key, self.calls.count(args.key))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def hang(*_):
    await asyncio.Event().wait()


def echo(latency=0.0):
    async def run(key, _n):
        if latency:
            await asyncio.sleep(latency)
        return f"result {key}"
    return run


def fails(exc, times=math.inf):
    """Raise exc on the first `times` calls with the same key, then succeed."""
    async def run(key, n):
        if n <= times:
            raise exc
        return f"result {key} after {n}"
    return run


class Search:
    name, description, args_type = "search", "web search", Query

    async def __call__(self, args):
        return " | ".join(args.query)


def test_tool_contract_is_a_protocol():
    assert isinstance(Search(), Tool)
    assert isinstance(FunctionTool("f", str, Key), Tool)


def test_tool_spec_is_the_chat_template_function_format():
    class Inner(msgspec.Struct):
        x: int

    class Nested(msgspec.Struct):
        inner: Inner

    assert tool_spec(Search()) == {"name": "search", "description": "web search", "parameters": {
        "type": "object", "properties": {"query": {"type": "array", "items": {"type": "string"}}},
        "required": ["query"], "additionalProperties": False}}
    nested = tool_spec(FunctionTool("n", str, Nested, "nested"))["parameters"]
    assert nested["properties"]["inner"] == {"$ref": "#/$defs/Inner"} and "Inner" in nested["$defs"]


def test_load_with_hanging_calls_finishes_within_the_timeout_bound():
    # timeout 1 s: with 0.2 s a fresh-clone CI run on this loaded 2-core VM saw one 5 ms call time out
    # (the loop thread descheduled for ~0.2 s); what is tested is unchanged: hanging calls end at the
    # timeout, the others succeed, and the whole map stays within one timeout of the ideal
    calls, concurrency, latency, timeout = 1000, 100, 0.005, 1.0
    hanging = set(range(0, calls, 20))  # 5%

    async def behave(key, _n):
        if key in hanging:
            await hang()
        await asyncio.sleep(latency)
        return f"result {key}"

    tool = Script("slow", behave)
    limits = ToolLimits(concurrency=concurrency, timeout_s=timeout, retries=0)
    with ToolRunner([tool], limits=limits) as runner:
        t0 = time.perf_counter()
        obs = runner.map([("slow", {"key": i}) for i in range(calls)], timeout=30)
        wall = time.perf_counter() - t0
        m = runner.metrics()["tools"]["slow"]
    bound = math.ceil(calls / concurrency) * latency + timeout + 1.5  # slack: a shared 2-core machine
    assert wall < bound, (wall, bound)
    for i, o in enumerate(obs):
        if i in hanging:
            assert (o.ok, o.error_kind, o.text) == (False, "timeout", "[tool error] slow: timeout after 1s")
            assert timeout - 0.005 <= o.latency_s < timeout + 3.0  # uvloop timers have 1 ms resolution
        else:
            assert (o.ok, o.text, o.attempts) == (True, f"result {i}", 1)
    assert tool.cancelled == len(hanging)  # timed-out calls were really cancelled, not left running
    assert (m["calls"], m["ok"], m["timeouts"], m["errors"], m["in_flight"]) == (calls, 950, 50, 50, 0)
    lat = m["latency_s"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] and lat["max"] >= timeout


def test_concurrency_limit_is_respected():
    running, peak = 0, 0

    async def behave(key, _n):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.002)
        running -= 1
        return "ok"

    with ToolRunner([Script("t", behave)], limits=ToolLimits(concurrency=7)) as runner:
        assert all(o.ok for o in runner.map([("t", {"key": i}) for i in range(100)]))
    assert peak == 7


def test_slot_handed_to_a_waiter_cancelled_before_it_runs_is_passed_on():
    async def main():
        slots = Slots(1)
        await slots.__aenter__()
        first = asyncio.ensure_future(slots.__aenter__())
        second = asyncio.ensure_future(slots.__aenter__())
        await asyncio.sleep(0)  # both wait
        await slots.__aexit__()  # hands the slot to `first`...
        first.cancel()  # ...which is cancelled before it resumes: the slot must go on to `second`
        await asyncio.wait_for(second, 1)  # would time out if the slot had been lost
        assert first.cancelled() and slots.free == 0
        await slots.__aexit__()
        assert slots.free == 1 and not slots.waiters

    asyncio.run(main())


def test_qps_limit_counts_starts_per_window():
    qps, burst, n = 50.0, 3, 40
    tool = Script("api", echo(0.001))
    with ToolRunner([tool], limits=ToolLimits(qps=qps, burst=burst, concurrency=64)) as runner:
        assert all(o.ok for o in runner.map([("api", {"key": i}) for i in range(n)]))
    starts = sorted(tool.starts)
    # GCRA: at most burst + qps * w starts in any window of w seconds (+1 for timer granularity).
    for w in (0.05, 0.2, 0.5):
        worst = max(sum(1 for t in starts[i:] if t < s + w) for i, s in enumerate(starts))
        assert worst <= burst + qps * w + 1, (w, worst)
    assert starts[-1] - starts[0] >= (n - burst) / qps * 0.95  # the limit is reached, not just respected


@pytest.mark.parametrize("exc, kind", [(TransientToolError("503 from provider"), "transient"),
                                       (ConnectionResetError("reset by peer"), "transient")])
def test_transient_errors_are_retried_then_succeed(exc, kind):
    tool = Script("t", fails(exc, times=2))
    limits = ToolLimits(retries=2, backoff_s=0.05, jitter=0.0)
    with ToolRunner([tool], limits=limits) as runner:
        t0 = time.perf_counter()
        ok = runner.submit("t", {"key": 1}).result(10)
        elapsed = time.perf_counter() - t0
        tool2 = Script("u", fails(exc, times=5))
    assert (ok.ok, ok.text, ok.attempts) == (True, "result 1 after 3", 3)
    # two backoffs: 0.05 s then doubled; libuv's timers count whole milliseconds from the loop's
    # cached clock, so each may fire up to 1 ms early (seen: 0.1499 s)
    assert elapsed >= 0.05 + 0.1 - 2e-3
    with ToolRunner([tool2], limits=ToolLimits(retries=1, backoff_s=0.001)) as runner:
        bad = runner.submit("u", {"key": 1}).result(10)
        m = runner.metrics()["tools"]["u"]
    assert (bad.ok, bad.error_kind, bad.attempts, m["retries"]) == (False, kind, 2, 1)
    assert bad.text.startswith("[tool error] u: ") and str(exc) in bad.text


def test_backoff_is_exponential_capped_and_seeded():
    limits = ToolLimits(backoff_s=0.1, backoff_max_s=0.5, jitter=0.5)
    delays = [[ToolRunner([Search()], seed=seed)._backoff(limits, k) for k in range(1, 7)] for seed in (0, 0, 1)]
    assert delays[0] == delays[1] and delays[0] != delays[2]  # reproducible per seed
    for seq in delays:
        for k, d in enumerate(seq, start=1):
            full = min(0.5, 0.1 * 2 ** (k - 1))
            assert full * 0.5 <= d <= full
    no_jitter = ToolRunner([Search()])._backoff(ToolLimits(backoff_s=0.1, jitter=0.0), 3)
    assert no_jitter == pytest.approx(0.4)


def test_timeouts_are_retried():
    async def first_hangs(key, n):
        if n == 1:
            await hang()
        return "second try"

    with ToolRunner([Script("t", first_hangs)], limits=ToolLimits(timeout_s=0.05, retries=1, backoff_s=0)) as runner:
        obs = runner.submit("t", {"key": 0}).result(10)
        m = runner.metrics()["tools"]["t"]
    assert (obs.ok, obs.text, obs.attempts, m["timeouts"], m["retries"]) == (True, "second try", 2, 1, 1)


@pytest.mark.parametrize("exc, text", [(ToolError("page not found"), "[tool error] t: page not found"),
                                       (ValueError("boom"), "[tool error] t: ValueError: boom")])
def test_other_errors_are_not_retried(exc, text):
    tool = Script("t", fails(exc))
    with ToolRunner([tool], limits=ToolLimits(retries=3, backoff_s=0)) as runner:
        obs = runner.submit("t", {"key": 0}).result(10)
    assert (obs.ok, obs.error_kind, obs.text, obs.attempts, tool.calls) == (False, "error", text, 1, [0])


def test_backup_serves_when_the_primary_fails():
    primary = Script("search", fails(TransientToolError("overloaded")))
    backup = Script("search_backup", echo())
    limits = ToolLimits(retries=1, backoff_s=0.001)
    with ToolRunner([primary, backup], limits=limits, backups={"search": "search_backup"}) as runner:
        obs = runner.submit("search", {"key": 4}).result(10)
        bad = runner.submit("search", {"key": "four"}).result(10)  # bad arguments: no backup
        m = runner.metrics()["tools"]
    assert (obs.ok, obs.text, obs.backup, obs.attempts, obs.tool) == (True, "result 4", "search_backup", 3, "search")
    assert (bad.error_kind, backup.calls) == ("bad_arguments", [4])
    assert (m["search"]["backup_used"], m["search"]["ok"], m["search_backup"]["calls"]) == (1, 1, 1)


def test_backup_failure_reports_both():
    primary = Script("a", fails(ToolError("primary down")))
    backup = Script("b", fails(ToolError("backup down too")))
    with ToolRunner([primary, backup], backups={"a": "b"}) as runner:
        obs = runner.submit("a", {"key": 0}).result(10)
    assert obs.text == "[tool error] a: primary down; backup b failed: backup down too"
    assert (obs.ok, obs.attempts) == (False, 2)


def test_cache_hits_are_counted_and_keys_are_canonical():
    tool = Script("t", echo())
    with ToolRunner([tool], cache_size=2) as runner:
        spellings = ['{"key": 1}', '{ "key":1 }', {"key": 1}, Key(1)]
        obs = [runner.submit("t", s).result(10) for s in spellings]
        assert [o.cached for o in obs] == [False, True, True, True] and {o.text for o in obs} == {"result 1"}
        assert obs[1].attempts == 0
        runner.map([("t", {"key": 2}), ("t", {"key": 3})])  # LRU size 2: evicts key 1
        assert not runner.submit("t", {"key": 1}).result(10).cached
        m = runner.metrics()
    assert tool.calls == [1, 2, 3, 1]
    assert (m["tools"]["t"]["cache_hits"], m["cache_entries"]) == (3, 2)


def test_failures_and_uncacheable_tools_are_not_cached():
    flaky = Script("flaky", fails(ToolError("no"), times=1))
    fresh = Script("fresh", echo(), cacheable=False)
    with ToolRunner([flaky, fresh], limits=ToolLimits(retries=0)) as runner:
        first, second = (runner.submit("flaky", {"key": 0}).result(10) for _ in range(2))
        runner.map([("fresh", {"key": 0})] * 3)
    assert (first.ok, second.ok, second.cached) == (False, True, False)
    assert (flaky.calls, fresh.calls) == ([0, 0], [0, 0, 0])


def test_identical_calls_in_flight_are_coalesced():
    tool = Script("t", echo(0.05))
    with ToolRunner([tool]) as runner:
        obs = runner.map([("t", {"key": 9})] * 10)
        m = runner.metrics()["tools"]["t"]
    assert tool.calls == [9] and all(o.text == "result 9" for o in obs)
    assert sorted(o.cached for o in obs) == [False] + [True] * 9 and m["coalesced"] == 9


def test_error_observations_have_the_documented_text():
    with ToolRunner([Search(), FunctionTool("python", str, Key)]) as runner:
        unknown, bad, malformed, extra = runner.map([
            ("browse", {"url": "x"}), ("search", '{"query": "a"}'), ("search", '{"query": ['),
            ("search", {"query": ["a"], "page": 2})])
        assert runner.metrics()["unknown_tool"] == 1
    assert unknown == Observation("browse", "[tool error] unknown tool 'browse' (available: python, search)", False,
                                  "unknown_tool", unknown.latency_s)
    assert bad.text == "[tool error] search: bad arguments: Expected `array`, got `str` - at `$.query`"
    assert malformed.text.startswith("[tool error] search: bad arguments: malformed JSON: ")
    assert extra.text == "[tool error] search: bad arguments: Object contains unknown field `page`"
    assert {o.error_kind for o in (bad, malformed, extra)} == {"bad_arguments"}


def test_a_tool_returning_a_non_string_is_an_error():
    async def wrong(key, _n):
        return key

    with ToolRunner([Script("t", wrong)]) as runner:
        obs = runner.submit("t", {"key": 3}).result(10)
    assert (obs.ok, obs.text) == (False, "[tool error] t: tool returned int, expected str")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@pytest.fixture(scope="module")
def fuzz_runner():
    with ToolRunner([Search(), Script("key", echo())], limits=ToolLimits(timeout_s=1)) as runner:
        yield runner


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["search", "key", "nope"]) | st.text(max_size=30) | json_values,
       args=json_values | st.text(max_size=60) | st.binary(max_size=30) | json_values.map(msgspec.json.encode))
def test_fuzzed_calls_never_raise(fuzz_runner, name, args):
    obs = fuzz_runner.submit(name, args).result(10)
    assert isinstance(obs, Observation) and isinstance(obs.text, str)
    assert obs.ok or (obs.text.startswith("[tool error] ") and obs.error_kind in ("unknown_tool", "bad_arguments"))


def test_async_callers_on_their_own_loop_and_on_the_runners():
    inner = Search()

    class Nested:  # a tool that calls another tool through the runner, on the runner's loop
        name, description, args_type = "nested", "calls search", Query

        async def __call__(self, args):
            obs = await runner.call("search", {"query": args.query + ["nested"]})
            return obs.text.upper()

    runner = ToolRunner([inner, Nested()])

    async def main():
        one = await runner.call("search", {"query": ["a"]})
        calls = [("search", {"query": [str(i)]}) for i in range(5)] + [("nested", '{"query": ["x"]}')]
        many = await runner.call_many(calls)
        return one, many

    try:
        one, many = asyncio.run(main())
    finally:
        runner.close()
    assert one.text == "a" and [o.text for o in many] == ["0", "1", "2", "3", "4", "X | NESTED"]


def test_function_tool_runs_in_the_thread_pool():
    def where(args):
        return threading.current_thread().name

    with ToolRunner([FunctionTool("where", where, Key, "thread name")]) as runner:
        obs = runner.submit("where", {"key": 0}).result(10)
        assert runner.metrics()["loop"] == "uvloop"
    assert obs.ok and obs.text.startswith("tool-runner-fn")


def test_asyncio_loop_factory():
    with ToolRunner([Search()], loop_factory=asyncio.new_event_loop) as runner:
        assert runner.submit("search", {"query": ["q"]}).result(10).text == "q"
        assert runner.metrics()["loop"] == "asyncio"


def test_close_with_calls_in_flight():
    tool = Script("t", hang)
    released = threading.Event()
    stuck = FunctionTool("stuck", lambda args: str(released.wait(5)), Key)  # a sync fn that ignores cancellation
    runner = ToolRunner([tool, stuck], limits=ToolLimits(timeout_s=30))
    futs = runner.submit_many([("t", {"key": i}) for i in range(20)] + [("stuck", {"key": 0})])
    time.sleep(0.1)
    assert runner.metrics()["tools"]["t"]["in_flight"] == 20
    t0 = time.perf_counter()
    runner.close()
    assert time.perf_counter() - t0 < 2.0  # neither the hanging coroutines nor the stuck thread block close
    released.set()
    obs = [f.result(1) for f in futs]
    assert all(o.error_kind == "closed" and o.text == f"[tool error] {o.tool}: tool runner closed" for o in obs)
    assert tool.cancelled == 20 and not runner._thread.is_alive()
    runner.close()  # idempotent
    late = runner.submit("t", {"key": 0}).result(1)
    assert late.error_kind == "closed" and runner.metrics()["closed"]


def test_close_with_calls_queued_for_a_slot():
    tool = Script("t", hang)
    runner = ToolRunner([tool], limits=ToolLimits(concurrency=2, timeout_s=30))
    futs = runner.submit_many([("t", {"key": i}) for i in range(50)])
    time.sleep(0.1)
    m = runner.metrics()["tools"]["t"]
    assert (m["in_flight"], m["queued"]) == (2, 48)
    runner.close()
    assert [f.result(1).error_kind for f in futs] == ["closed"] * 50
    assert tool.calls == [0, 1] and tool.cancelled == 2  # queued calls never started


def test_close_before_start_and_aclose():
    ToolRunner([Search()]).close()

    async def main():
        async with ToolRunner([Search()]) as runner:
            obs = await runner.call("search", {"query": ["z"]})
        return obs, runner

    obs, runner = asyncio.run(main())
    assert obs.text == "z" and not runner._thread.is_alive()


class Closable(Search):
    closed = 0

    async def aclose(self):
        Closable.closed += 1


def test_tools_with_aclose_are_closed_on_the_runner_loop():
    with ToolRunner([Closable()]) as runner:
        runner.submit("search", {"query": ["x"]}).result(10)
    assert Closable.closed == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"tools": [Search(), Search()]}, "unique"),
    ({"tools": [Search()], "backups": {"search": "nope"}}, "unknown tools"),
    ({"tools": [Search()], "per_tool": {"python": ToolLimits()}}, "unknown tools"),
    ({"tools": [FunctionTool("f", str, dict)]}, "msgspec.Struct"),
])
def test_bad_configuration_fails_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ToolRunner(**kwargs)


def test_limits_are_validated():
    with pytest.raises(ValueError, match="concurrency"):
        ToolLimits(concurrency=0)
    with pytest.raises(ValueError, match="qps"):
        ToolLimits(qps=-1.0)
