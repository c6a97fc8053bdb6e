"""The tool contract: what the ToolRunner calls, and the two exceptions a tool may raise.

A tool is any object with

    name: str                          # what the model writes in {"name": ...}
    description: str                   # shown to the model in the system prompt
    args_type: type[msgspec.Struct]    # argument schema; the runner decodes and validates with it
    async def __call__(self, args) -> str

and optionally `cacheable: bool` (default True; False for tools whose result may change between
identical calls, like code execution) and `async def aclose()` (called once on the runner's loop
when the runner closes: HTTP clients and the like). Nothing here imports the runner, so tool
modules (env/tools.py, env/http.py, env/sandbox.py) depend only on this file.

Failures a tool reports: raise `TransientToolError` for what may succeed on retry (the runner
retries with backoff; connection errors and timeouts count too), `ToolError` for what will not
(the message is shown to the model verbatim). Any other exception is a bug in the tool: the runner
still turns it into an error observation, named by its exception type.

    class Lookup(msgspec.Struct):
        key: str

    def lookup(args: Lookup) -> str: ...
    tool = FunctionTool("lookup", lookup, Lookup, "Look a key up in the table.")
    tool_spec(tool)   # {"name": "lookup", "description": ..., "parameters": <JSON schema>} for prompts
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable, Protocol, runtime_checkable

import msgspec


class ToolError(Exception):
    """A failure the tool reports on purpose; the message goes to the model as is. Not retried."""


class TransientToolError(ToolError):
    """A failure that may go away on retry (provider overloaded, connection reset, HTTP 5xx)."""


@runtime_checkable
class Tool(Protocol):
    """What the ToolRunner calls. `cacheable` and `aclose` are optional (see the module docstring)."""

    name: str
    description: str
    args_type: type[msgspec.Struct]

    async def __call__(self, args: Any) -> str: ...


def tool_spec(tool: Tool) -> dict[str, Any]:
    """{"name", "description", "parameters": JSON schema of args_type}: the function format chat
    templates (Qwen, Llama, OpenAI) render into the system prompt."""
    schema = msgspec.json.schema(tool.args_type)
    defs = schema.pop("$defs", {})
    params = dict(defs.pop(schema.pop("$ref").rsplit("/", 1)[-1])) if "$ref" in schema else schema
    params.pop("title", None)
    if defs:  # nested structs keep their definitions beside the top-level object
        params["$defs"] = defs
    return {"name": tool.name, "description": tool.description, "parameters": params}


class FunctionTool:
    """Adapts a synchronous `fn(args) -> str` into a Tool; each call runs in the loop's thread pool.

    The thread pool is the running loop's default executor (the ToolRunner sizes it and shuts it
    down). A sync function that hangs keeps its thread busy after a timeout: Python threads cannot
    be killed, so give hanging work its own process (env/sandbox.py) instead.
    """

    def __init__(self, name: str, fn: Callable[[Any], str], args_type: type[msgspec.Struct],
                 description: str = "", *, cacheable: bool = True):
        self.name, self.fn, self.args_type = name, fn, args_type
        self.description = description or (fn.__doc__ or "").strip()
        self.cacheable = cacheable

    async def __call__(self, args: Any) -> str:
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(self.fn, args))

    def __repr__(self) -> str:
        return f"FunctionTool({self.name!r}, {getattr(self.fn, '__qualname__', self.fn)!r})"
