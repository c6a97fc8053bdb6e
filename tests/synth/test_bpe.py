"""The world's tokenizer keeps entity names in sub-word pieces that many names share."""

from collections import Counter

import numpy as np

from sailor_engine.model.tokenizer import SPECIAL_TOKENS
from sailor_engine.synth.bpe import train_tokenizer
from sailor_engine.synth.config import SynthConfig
from sailor_engine.synth.corpus import build_corpus
from sailor_engine.synth.graph import synthetic_world


def test_names_split_into_shared_pieces():
    cfg = SynthConfig(num_entities=2000)
    g = synthetic_world(cfg)
    texts = [p.text for p in build_corpus(g, cfg.distractor_pages, np.random.default_rng(0))]
    tok = train_tokenizer(texts, cfg.vocab_size, cfg.max_token_chars, cfg.min_pair_frequency)
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    pieces = [tok.encode(" " + n).ids for n in g.names]
    assert min(len(p) for p in pieces) >= 2  # no name is a single token
    used_by = Counter(i for p in pieces for i in set(p))
    shared = np.mean([min(used_by[i] for i in p) >= 5 for p in pieces])
    assert shared >= 0.93, shared
    # Without the merge threshold the same corpus leaves more names with rare pieces.
    loose = train_tokenizer(texts, cfg.vocab_size, cfg.max_token_chars, 0)
    pieces = [loose.encode(" " + n).ids for n in g.names]
    used_by = Counter(i for p in pieces for i in set(p))
    assert np.mean([min(used_by[i] for i in p) >= 5 for p in pieces]) < shared
