"""The ReAct agent format: prompt layout, parsing a model turn into an action, observations.

    <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n
    <think>...</think><tool_call>{"name": "search", "arguments": {"query": ["..."]}}</tool_call>     (policy)
    \n<tool_response>\n...\n</tool_response>\n                                                       (environment)
    <think>...</think><answer>...</answer>                                                          (policy)

The whole episode is one assistant turn; the environment's tool responses are spliced in between
the policy's segments. Every segment is tokenised on its own and the ids are concatenated, which
is exactly how a rollout builds its token stream (prompt ids + generated ids + observation ids).
RFT data rendered by `render_messages` is therefore token-identical to what the policy sees when
it acts, and nothing is ever re-rendered after the fact.

A turn's text becomes an `Action`: `ToolCall`, `Answer` or `Malformed` (with the reason the
model will read). The python tool's code may be given inside <code>...</code> within the tool call.
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence

import msgspec

from sailor_engine.model.tokenizer import Tokenizer

SYSTEM_PROMPT = (
    "You are a web research agent. Think inside <think></think>, call one tool per step inside "
    "<tool_call></tool_call> as JSON {{\"name\": ..., \"arguments\": ...}}, read the result in "
    "<tool_response></tool_response>, and finish with the answer inside <answer></answer>.\n"
    "Tools:\n{tools}"
)
ANSWER_NOW = ("You have used all your tool calls (or the context is full). Give your best final answer now, "
              "inside <answer></answer>, without calling tools.")
STOP_TAGS = ("</tool_call>", "</answer>", "<tool_response>", "<|im_end|>", "<|endoftext|>")


class ToolCall(msgspec.Struct, frozen=True):
    name: str
    arguments: dict


class Answer(msgspec.Struct, frozen=True):
    text: str


class Malformed(msgspec.Struct, frozen=True):
    reason: str


Action = ToolCall | Answer | Malformed


class _CallJSON(msgspec.Struct):
    name: str
    arguments: dict = {}


def parse_turn(text: str) -> Action:
    """The action a model turn ends with. Never raises; problems become `Malformed(reason)`."""
    a_close = text.rfind("</answer>")
    c_close = text.rfind("</tool_call>")
    if a_close >= 0 and a_close > c_close:
        start = text.rfind("<answer>", 0, a_close)
        if start < 0:
            return Malformed("</answer> without a matching <answer>")
        return Answer(text[start + len("<answer>"):a_close].strip())
    if c_close < 0:
        if "<tool_call>" in text:
            return Malformed("<tool_call> was not closed with </tool_call>")
        return Malformed("the turn has neither a <tool_call> nor an <answer>")
    start = text.rfind("<tool_call>", 0, c_close)
    if start < 0:
        return Malformed("</tool_call> without a matching <tool_call>")
    body = text[start + len("<tool_call>"):c_close]
    code = None
    c0, c1 = body.find("<code>"), body.rfind("</code>")
    if 0 <= c0 < c1:
        code = body[c0 + len("<code>"):c1].strip("\n")
        body = body[:c0] + body[c1 + len("</code>"):]
    try:
        call = msgspec.json.decode(body.strip().encode(), type=_CallJSON)
    except msgspec.DecodeError as e:
        return Malformed(f"the tool call is not valid JSON of the form {{\"name\": str, \"arguments\": object}}: {e}")
    args = dict(call.arguments)
    if code is not None:
        args.setdefault("code", code)
    return ToolCall(call.name, args)


class ChatTemplate:
    """Renders prompts, observations and RFT conversations as token ids (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, system: str = SYSTEM_PROMPT):
        self.tok, self.system = tokenizer, system
        missing = [t for t in STOP_TAGS + ("<tool_call>", "<answer>", "<|im_start|>") if t not in tokenizer.special]
        if missing:
            raise ValueError(f"tokenizer lacks the agent special tokens {missing}; call Tokenizer.add_special_tokens()")
        self.stop_ids = tuple(tokenizer.special[t] for t in STOP_TAGS)

    def system_text(self, tools: Iterable[object]) -> str:
        lines = []
        for t in tools:
            schema = msgspec.json.schema(t.args_type)
            lines.append(f"- {t.name}: {t.description} arguments: {json.dumps(schema.get('$defs', {}).get(t.args_type.__name__, schema))}")
        return self.system.format(tools="\n".join(lines))

    def prompt(self, question: str, system: str) -> list[int]:
        text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        return self.tok.encode(text)

    def observation(self, text: str) -> list[int]:
        return self.tok.encode(f"\n<tool_response>\n{text}\n</tool_response>\n")

    def render_messages(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """An RFT conversation -> (ids, loss_mask). Roles: system, user, assistant, tool.

        The first system + user pair forms the prompt; assistant contents are the policy's segments
        (mask 1); tool contents become observations (mask 0).
        """
        if len(messages) < 3 or messages[0].get("role") != "system" or messages[1].get("role") != "user":
            raise ValueError("a conversation starts with a system and a user message, then the assistant")
        ids = self.prompt(messages[1]["content"], messages[0]["content"])
        mask = [0] * len(ids)
        for i, m in enumerate(messages[2:], start=2):
            role = m.get("role")
            if role == "assistant":
                seg, bit = self.tok.encode(m["content"]), 1
            elif role == "tool":
                seg, bit = self.observation(_unwrap(m["content"])), 0
            else:
                raise ValueError(f"message {i}: role {role!r} after the prompt (expected assistant or tool)")
            ids += seg
            mask += [bit] * len(seg)
        return ids, mask


def _unwrap(text: str) -> str:
    """Tool contents may arrive already wrapped in <tool_response> tags (synth/expert.py writes them so)."""
    t = text.strip("\n")
    if t.startswith("<tool_response>") and t.endswith("</tool_response>"):
        return t[len("<tool_response>"):-len("</tool_response>")].strip("\n")
    return text
