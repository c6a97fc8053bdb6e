"""Copy drills (train/drills.py): the batches, the loss against a float64 reference, determinism, and
that a tiny decoder actually learns to copy (an induction task no fixed position offset solves)."""

from __future__ import annotations

import msgspec
import pytest
import torch

from sailor_engine.config import ConfigError, load_config
from sailor_engine.model import ModelConfig, Transformer
from sailor_engine.train.config import DrillConfig
from sailor_engine.train.drills import copy_accuracy, copy_drills, drill_batch

V, FIRST = 48, 8


def _model(seed: int = 0, vocab: int = V, hidden: int = 32) -> Transformer:
    cfg = ModelConfig(family="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=2,
                      num_heads=4, num_kv_heads=2, qkv_bias=True, max_position_embeddings=256)
    return Transformer(cfg).init_weights(generator=torch.Generator().manual_seed(seed))


def test_a_drill_is_a_random_sequence_written_twice():
    gen = torch.Generator().manual_seed(0)
    lengths = set()
    for _ in range(50):
        seq, n = drill_batch(gen, 5, 3, 9, FIRST, V)
        assert seq.shape == (5, 2 * n) and 3 <= n <= 9
        assert torch.equal(seq[:, :n], seq[:, n:])
        assert FIRST <= int(seq.min()) and int(seq.max()) < V
        lengths.add(n)
    assert lengths == set(range(3, 10))  # every length, so no fixed offset solves the task


def test_the_loss_is_the_second_copy_cross_entropy():
    model = _model()
    cfg = DrillConfig(steps=1, lr=1e-3, warmup_steps=0, batch_size=4, min_len=5, max_len=5)
    # the batch the first step draws, and its reference loss in float64 before the update
    seq, n = drill_batch(torch.Generator().manual_seed(3), 4, 5, 5, FIRST, V)
    with torch.no_grad():
        logp = torch.log_softmax(model(seq[:, :-1]).double(), -1)
    want = -logp[:, n:].gather(-1, seq[:, n + 1:, None]).mean().item()
    (row,) = copy_drills(model, cfg, first_token=FIRST, vocab_size=V, seed=3)
    assert row["step"] == 1 and row["loss"] == pytest.approx(want, rel=1e-6)


def test_seeded_drills_give_the_same_weights():
    cfg = DrillConfig(steps=5, batch_size=4, max_len=12)
    a, b = _model(), _model()
    ra = copy_drills(a, cfg, first_token=FIRST, vocab_size=V, seed=1)
    rb = copy_drills(b, cfg, first_token=FIRST, vocab_size=V, seed=1)
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_a_small_decoder_learns_to_copy():
    # 2 layers, width 64, 504 drill tokens (few repeats inside a sequence, so copying is unambiguous):
    # the ability appears abruptly around step 900 (the induction-head phase change)
    model = _model(vocab=512, hidden=64)
    probe = dict(first_token=FIRST, vocab_size=512, seed=99, length=24)
    before = copy_accuracy(model, **probe)
    rows = copy_drills(model, DrillConfig(steps=1200, lr=1e-3, batch_size=32, min_len=8, max_len=24),
                       first_token=FIRST, vocab_size=512, seed=0)
    after = copy_accuracy(model, **probe)
    assert before < 0.02 and after > 0.9, (before, after, rows[-1])
    assert rows[99]["copy_accuracy"] < 0.1  # not solved early: the drills, not the probe, are doing it


def test_bad_drill_settings_name_the_field():
    with pytest.raises((ConfigError, msgspec.ValidationError, ValueError), match="train.drill.min_len"):
        load_config(None, ["train.drill.min_len=30", "train.drill.max_len=10"])
    with pytest.raises(ValueError, match="first_token"):
        copy_drills(_model(), DrillConfig(steps=1), first_token=V, vocab_size=V, seed=0)
