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


class Tokenizer:
    """tokenizer.json through the `tokenizers` package, with the agent tokens resolved to ids.

        tok = Tokenizer.from_file("data/tokenizer.json")   # or the directory holding it
        ids = tok.encode("<think>hi</think>")                # special tokens are single ids
        tok.special["</tool_call>"]                          # -> int, or KeyError naming the token

    Special tokens missing from a checkpoint's tokenizer are added by `add_special_tokens`, which
    returns how many ids were appended (the model's embedding must then be resized).
    """

    def __init__(self, inner):
        self.inner = inner
        self.special = self._resolve()

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        from pathlib import Path

        from tokenizers import Tokenizer as _Inner

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.exists():
            raise FileNotFoundError(f"{p}: tokenizer.json not found")
        return cls(_Inner.from_file(str(p)))

    def _resolve(self) -> dict[str, int]:
        ids = {t: self.inner.token_to_id(t) for t in SPECIAL_TOKENS}
        return {t: i for t, i in ids.items() if i is not None}

    def add_special_tokens(self, tokens=SPECIAL_TOKENS) -> int:
        before = self.inner.get_vocab_size(with_added_tokens=True)
        self.inner.add_special_tokens([t for t in tokens if self.inner.token_to_id(t) is None])
        self.special = self._resolve()
        return self.inner.get_vocab_size(with_added_tokens=True) - before

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self.special[EOS_TOKEN]

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.inner.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path) -> None:
        self.inner.save(str(path))
