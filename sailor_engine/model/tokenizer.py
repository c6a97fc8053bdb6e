"""Tokenizer: a thin wrapper over the `tokenizers` package (tokenizer.json), plus the agent format's tokens.

The ReAct tags are special tokens, so a tag is always exactly one id: generation can stop on it,
the loss mask can be cut on it, and a model never has to spell a tag out of sub-words.
"""

from __future__ import annotations

# Sequence control tokens, then the agent format's tags (see rollout/format.py for the grammar).
CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
AGENT_TAGS = (
    "<think>", "</think>",
    "<tool_call>", "</tool_call>",
    "<tool_response>", "</tool_response>",
    "<answer>", "</answer>",
    "<code>", "</code>",
)
SPECIAL_TOKENS = CONTROL_TOKENS + AGENT_TAGS
EOS_TOKEN = "<|endoftext|>"
