"""HttpTool: plugs a real search / fetch provider (or a proxy in front of one) in by URL.

The offline tools (env/tools.py) stand in for the web during training; the papers' real
environment calls search and page-fetch services instead. HttpTool is that adapter: it POSTs the
validated arguments as JSON and hands the reply's text to the model.

    class SearchArgs(msgspec.Struct):
        query: list[str]

    search = HttpTool("search", "http://127.0.0.1:8080/search", SearchArgs, "Web search.",
                      headers={"Authorization": f"Bearer {os.environ['SEARCH_KEY']}"})
    ToolRunner([search, ...], per_tool={"search": ToolLimits(qps=20, concurrency=16)})

Reply: `application/json` -> a JSON string is used as is, an object's `text_field` (default "text")
if present, anything else re-encoded as compact JSON; other content types -> the body as text.
Bodies are read up to max_bytes (the rest is dropped with a marker). Failures follow the runner's
contract: 5xx, 408, 429, timeouts and connection errors raise TransientToolError (the runner
retries them with backoff, then tries the backup tool); other statuses raise ToolError (shown to
the model, not retried). One httpx.AsyncClient (connection pool) per event loop, closed by the
runner through `aclose()`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Mapping

import httpx
import msgspec

from sailor_engine.env.protocol import ToolError, TransientToolError

_TRANSIENT_STATUS = frozenset({408, 425, 429})  # plus every 5xx
_SNIPPET = 300  # characters of an error reply's body quoted in the error message


class HttpTool:
    """A Tool whose work is done by an HTTP endpoint (see the module docstring)."""

    def __init__(self, name: str, url: str, args_type: type[msgspec.Struct], description: str = "", *,
                 headers: Mapping[str, str] | None = None, timeout_s: float = 30.0, max_bytes: int = 1 << 20,
                 text_field: str | None = "text", cacheable: bool = True, max_connections: int = 100):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"HttpTool {name!r}: url must start with http:// or https://, got {url!r}")
        self.name, self.url, self.args_type = name, url, args_type
        self.description = description or f"{name} (served by {url})"
        self.cacheable, self.text_field, self.max_bytes = cacheable, text_field, max_bytes
        self._headers = {"content-type": "application/json", **(headers or {})}
        self._timeout = httpx.Timeout(timeout_s)
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def _client_here(self) -> httpx.AsyncClient:
        # An AsyncClient's connections belong to the loop that opened them.
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            # A client left on another loop cannot be closed from this one; only tests switch loops.
            self._client = httpx.AsyncClient(headers=self._headers, timeout=self._timeout, limits=self._limits)
            self._client_loop = loop
        return self._client

    async def __call__(self, args: Any) -> str:
        body = msgspec.json.encode(args)
        try:
            async with self._client_here().stream("POST", self.url, content=body) as reply:
                data, truncated = await _read_capped(reply, self.max_bytes)
        except httpx.TimeoutException as e:
            raise TransientToolError(f"HTTP timeout ({type(e).__name__})") from e
        except httpx.TransportError as e:
            raise TransientToolError(f"connection error ({type(e).__name__}: {e})") from e
        except httpx.HTTPError as e:  # undecodable body, redirect loop, bad URL: retrying will not help
            raise ToolError(f"HTTP error ({type(e).__name__}: {e})") from e
        status = reply.status_code
        if not 200 <= status < 300:
            snippet = data[:_SNIPPET].decode(reply.encoding or "utf-8", "replace").strip()
            message = f"HTTP {status} {reply.reason_phrase}" + (f": {snippet}" if snippet else "")
            raise (TransientToolError if status >= 500 or status in _TRANSIENT_STATUS else ToolError)(message)
        text = self._text(reply, data)
        return f"{text}\n[reply truncated at {self.max_bytes} bytes]" if truncated else text

    def _text(self, reply: httpx.Response, data: bytes) -> str:
        if reply.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return data.decode(reply.encoding or "utf-8", "replace")
        try:
            value = msgspec.json.decode(data)
        except msgspec.DecodeError as e:
            raise ToolError(f"reply is not valid JSON: {e}") from e
        if isinstance(value, dict) and self.text_field is not None and self.text_field in value:
            value = value[self.text_field]
        return value if isinstance(value, str) else msgspec.json.encode(value).decode()

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def __repr__(self) -> str:
        return f"HttpTool({self.name!r}, {self.url!r})"


async def _read_capped(reply: httpx.Response, max_bytes: int) -> tuple[bytes, bool]:
    """The first max_bytes of the body, and whether more was dropped (the rest is not read)."""
    data = bytearray()
    async for chunk in reply.aiter_bytes():
        data += chunk
        if len(data) > max_bytes:
            return bytes(data[:max_bytes]), True
    return bytes(data), False
