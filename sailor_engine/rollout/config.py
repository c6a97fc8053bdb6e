"""Rollout section of the config: sampling, episode limits, and the tool runner of the ReAct agent loop.

A frozen msgspec Struct (validated on decode, hashable); sailor_engine.config composes it with the
other sections. Purely declarative: the Generator, ToolRunner and AgentLoop read it. The group
size G lives in the algo section (algo.group_size) and search's top-k in the synth section
(synth.search_top_k), each in one place only.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta


class RolloutConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Multi-turn ReAct episodes generated in-process, with tools running concurrently."""

    # -- sampling (papers: temperature 1.0, top-p 1.0) --
    temperature: Annotated[float, Meta(ge=0, description="Sampling temperature (papers: 1.0); 0 is greedy.")] = 1.0
    top_p: Annotated[float, Meta(gt=0, le=1, description="Nucleus sampling mass (papers: 1.0, i.e. off).")] = 1.0
    top_k: Annotated[int, Meta(ge=0, description="Sample among the k most likely tokens; 0 is off.")] = 0
    max_new_tokens: Annotated[int, Meta(ge=1, description="Tokens one assistant turn may generate before it is cut (finish 'length').")] = 2048

    # -- episode limits --
    max_turns: Annotated[int, Meta(ge=1, description="Assistant turns per episode (papers: <= 30 tool calls); at the limit the model is told to answer now.")] = 30
    max_context: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        Meta(description="Tokens of one trajectory (prompt, turns, tool responses; papers: ~32k); None: model.max_position_embeddings."),
    ] = None

    # -- generator --
    max_batch: Annotated[int, Meta(ge=1, description="Sequences decoding at once (KV-cache slots); a finished or parked episode frees its slot.")] = 64

    # -- tool runner --
    tools: Annotated[
        tuple[Literal["search", "visit", "python"], ...],
        Meta(description="Tools the agent may call (papers: search and visit; V2 adds python)."),
    ] = ("search", "visit")
    tool_timeout_s: Annotated[float, Meta(gt=0, description="Wall-clock limit of one tool call, seconds; past it the call becomes an error observation.")] = 10.0
    tool_concurrency: Annotated[int, Meta(ge=1, description="Calls in flight per tool.")] = 64
    tool_qps: Annotated[
        Annotated[float, Meta(gt=0)] | None,
        Meta(description="Calls started per second per tool (token bucket); None is unlimited."),
    ] = None
    tool_retries: Annotated[int, Meta(ge=0, description="Retries of a transient failure (timeout, connection error).")] = 2
    tool_backoff_s: Annotated[float, Meta(ge=0, description="Delay before the first retry, seconds; doubles with each retry.")] = 0.5
    tool_cache_size: Annotated[int, Meta(ge=0, description="LRU cache entries of tool results, keyed by tool and arguments; 0 is off.")] = 10_000

    # -- python tool sandbox (a separate process, no network) --
    sandbox_cpu_s: Annotated[float, Meta(gt=0, description="CPU-time limit of one python call, seconds (its wall limit is tool_timeout_s).")] = 10.0
    sandbox_memory_mb: Annotated[int, Meta(ge=16, description="Address-space limit of one python call, MiB.")] = 1024
    sandbox_output_chars: Annotated[int, Meta(ge=1, description="Characters of python output kept; the rest is cut with a marker.")] = 8192
