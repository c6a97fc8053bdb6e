"""HttpTool against a loopback stub provider: replies, retries of 5xx, 4xx errors, timeouts, refused connections."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
import pytest

from sailor_engine.env.http import HttpTool
from sailor_engine.env.runner import ToolLimits, ToolRunner


class Query(msgspec.Struct):
    query: list[str]


class Stub(BaseHTTPRequestHandler):
    """Routes by path; the server counts requests per path."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.seen.append((self.path, self.headers.get("authorization"), body))
        n = sum(1 for p, *_ in self.server.seen if p == self.path)
        route = {
            "/search": lambda: (200, "application/json",
                                {"text": "results for " + ", ".join(json.loads(body)["query"])}),
            "/plain": lambda: (200, "text/plain; charset=utf-8", "plain: " + body.decode()),
            "/list": lambda: (200, "application/json", [{"title": "a"}, {"title": "b"}]),
            "/flaky": lambda: (503, "text/plain", "overloaded") if n <= 2 else (200, "application/json", "recovered"),
            "/missing": lambda: (404, "text/plain", "no such index"),
            "/limited": lambda: (429, "text/plain", "slow down"),
            "/big": lambda: (200, "text/plain", "z" * 10_000),
            "/broken": lambda: (200, "application/json", None),
        }.get(self.path)
        if self.path == "/slow":
            time.sleep(0.6)
            route = lambda: (200, "text/plain", "late")  # noqa: E731
        status, ctype, payload = route() if route else (500, "text/plain", "no route")
        data = b"{not json" if payload is None else (
            payload.encode() if ctype.startswith("text/") else json.dumps(payload).encode())
        try:
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (timeout test)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    """127.0.0.1 only; stops by itself after 200 requests or 60 s, and at the end of the module."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    srv.daemon_threads, srv.timeout, srv.seen = True, 0.05, []
    stop = threading.Event()

    def serve():
        deadline = time.monotonic() + 60
        while not stop.is_set() and len(srv.seen) < 200 and time.monotonic() < deadline:
            srv.handle_request()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", srv
    stop.set()
    thread.join(2)
    srv.server_close()


def refused_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/search"


def tools(base, **kwargs):
    return [HttpTool(path.strip("/"), base + path, Query, **kwargs)
            for path in ("/search", "/plain", "/list", "/flaky", "/missing", "/limited", "/big", "/broken", "/slow")]


def test_replies_become_text(server):
    base, srv = server
    with ToolRunner(tools(base, headers={"Authorization": "Bearer k"}, max_bytes=1000),
                    limits=ToolLimits(retries=0)) as runner:
        search, plain, listing, big, broken = runner.map(
            [(name, {"query": ["sailor", "fog"]}) for name in ("search", "plain", "list", "big", "broken")])
    assert search.text == "results for sailor, fog"
    assert plain.text == 'plain: {"query":["sailor","fog"]}'  # the validated arguments, POSTed as compact JSON
    assert listing.text == '[{"title":"a"},{"title":"b"}]'
    assert big.text == "z" * 1000 + "\n[reply truncated at 1000 bytes]"
    assert not broken.ok and broken.text.startswith("[tool error] broken: reply is not valid JSON")
    assert ("/search", "Bearer k", b'{"query":["sailor","fog"]}') in srv.seen


def test_server_errors_are_retried_then_succeed(server):
    base, _ = server
    with ToolRunner(tools(base), limits=ToolLimits(retries=2, backoff_s=0.01)) as runner:
        obs = runner.submit("flaky", {"query": ["q"]}).result(10)
        m = runner.metrics()["tools"]["flaky"]
    assert (obs.ok, obs.text, obs.attempts, m["retries"]) == (True, "recovered", 3, 2)


def test_client_errors_are_not_retried_and_429_is(server):
    base, srv = server
    with ToolRunner(tools(base), limits=ToolLimits(retries=1, backoff_s=0.01)) as runner:
        missing, limited = runner.map([("missing", {"query": ["q"]}), ("limited", {"query": ["q"]})])
    assert missing.text == "[tool error] missing: HTTP 404 Not Found: no such index" and missing.attempts == 1
    assert (missing.error_kind, limited.error_kind, limited.attempts) == ("error", "transient", 2)
    assert limited.text == "[tool error] limited: HTTP 429 Too Many Requests: slow down"
    assert sum(1 for p, *_ in srv.seen if p == "/missing") == 1


def test_slow_provider_times_out(server):
    base, _ = server
    with ToolRunner(tools(base), limits=ToolLimits(timeout_s=0.2, retries=0)) as runner:
        obs = runner.submit("slow", {"query": ["q"]}).result(10)
    assert (obs.error_kind, obs.text) == ("timeout", "[tool error] slow: timeout after 0.2s")


def test_refused_connection_is_transient_and_the_backup_serves(server):
    base, _ = server
    dead = HttpTool("dead", refused_url(), Query)
    live = HttpTool("live", base + "/search", Query)
    with ToolRunner([dead, live], limits=ToolLimits(retries=1, backoff_s=0.01), backups={"dead": "live"}) as runner:
        obs = runner.submit("dead", {"query": ["x"]}).result(10)
        m = runner.metrics()["tools"]
    assert (obs.ok, obs.text, obs.backup, obs.attempts) == (True, "results for x", "live", 3)
    assert (m["dead"]["retries"], m["dead"]["backup_used"]) == (1, 1)
    with ToolRunner([HttpTool("dead", refused_url(), Query)], limits=ToolLimits(retries=0)) as runner:
        alone = runner.submit("dead", {"query": ["x"]}).result(10)
    assert alone.error_kind == "transient"
    assert alone.text.startswith("[tool error] dead: connection error (ConnectError")


def test_clients_are_closed_with_the_runner(server):
    base, _ = server
    tool = HttpTool("search", base + "/search", Query)
    with ToolRunner([tool]) as runner:
        assert runner.submit("search", {"query": ["a"]}).result(10).ok
        assert tool._client is not None
    assert tool._client is None


def test_bad_url_fails_at_construction():
    with pytest.raises(ValueError, match="http"):
        HttpTool("search", "ftp://example.com", Query)
