"""Train the world's tokenizer: byte-level BPE (the `tokenizers` package) with the agent tags as special tokens.

Special tokens come first, in sailor_engine.model.tokenizer.SPECIAL_TOKENS order, so each tag is
one id. Entity names must stay split into frequent sub-word pieces (syllables shared by many
names): a small model learns to copy pieces, not whole-name tokens it has seen a handful of times
(issue 8's calibration). Two knobs do it: `max_token_chars` caps a token's length and
`min_pair_frequency` refuses merges of rare pairs (without it, a 2000-entity world leaves ~8% of
names with a piece used by fewer than 5 names; with 30, ~5%, at a ~3% longer corpus).
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from sailor_engine.model.tokenizer import EOS_TOKEN, SPECIAL_TOKENS


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_token_chars: int, min_pair_frequency: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, nothing unknown
        max_token_length=max_token_chars,
        min_frequency=min_pair_frequency,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    assert tok.token_to_id(EOS_TOKEN) == SPECIAL_TOKENS.index(EOS_TOKEN)
    return tok
