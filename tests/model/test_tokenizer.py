"""Tokenizer wrapper: agent tags are single special ids, round trips are exact, missing tags get added."""

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, pre_tokenizers, trainers, decoders

from sailor_engine.model.tokenizer import AGENT_TAGS, EOS_TOKEN, SPECIAL_TOKENS, Tokenizer

TEXT = ["The Orvanu river flows past Keltiria, founded in 1843 by Marta Olsk.",
        "search the web for the founder of the Keltiria observatory",
        "tool responses are masked out of the loss"] * 20


def train(special):
    raw = RawTokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=list(special),
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return raw


def test_tags_are_single_ids_and_round_trip(tmp_path):
    train(SPECIAL_TOKENS).save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path)  # a directory works too
    assert set(tok.special) == set(SPECIAL_TOKENS)
    text = '<think>who founded it?</think><tool_call>{"name": "search"}</tool_call><answer>Marta Olsk</answer>'
    ids = tok.encode(text)
    for tag in AGENT_TAGS[:4] + ("<answer>", "</answer>"):
        assert ids.count(tok.special[tag]) == 1
    assert tok.decode(ids) == text
    assert tok.eos_id == tok.special[EOS_TOKEN]
    assert tok.encode_batch([text, "Keltiria"])[0] == ids


def test_missing_special_tokens_are_added(tmp_path):
    tok = Tokenizer(train([EOS_TOKEN]))
    assert "<tool_call>" not in tok.special
    before = tok.vocab_size
    added = tok.add_special_tokens()
    assert added == len(SPECIAL_TOKENS) - 1 and tok.vocab_size == before + added
    assert len(tok.encode("<tool_call>")) == 1
    assert tok.add_special_tokens() == 0  # idempotent


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path)
