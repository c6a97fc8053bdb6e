"""Data parallelism: the RFT loss's micro-batch shares sum to the full-batch loss, bad modes are refused,
dp=2 (DDP and FSDP2, gloo) equals one process on the concatenated batch, and FSDP2 ranks inside
`gathered` generate independently (no collective) with the whole weights."""

from pathlib import Path

import pytest
import torch

from sailor_engine.model import ModelConfig, Transformer
from sailor_engine.parallel.data import data_parallel, rft_loss
from sailor_engine.rl.loss import global_norm


def test_rft_loss_shares_sum_to_the_full_batch_loss():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(40, generator=g, dtype=torch.float64)
    mask = (torch.rand(40, generator=g) < 0.6).double()
    seq_ids = torch.repeat_interleave(torch.arange(5), torch.tensor([3, 9, 1, 20, 7]))
    cuts = [0, 12, 13, 40]  # micro-batches on sequence boundaries
    parts = [slice(a, b) for a, b in zip(cuts, cuts[1:])]
    norm = global_norm([mask[p] for p in parts], [seq_ids[p] for p in parts])
    assert norm.num_tokens == int(mask.sum())
    total = sum(rft_loss(logp[p], mask[p], norm) for p in parts)
    torch.testing.assert_close(total, -(logp * mask).sum() / mask.sum(), atol=0, rtol=1e-15)


def test_unknown_mode_is_refused_before_any_communication():
    model = Transformer(ModelConfig(vocab_size=11, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                                    num_kv_heads=2))
    with pytest.raises(ValueError, match=r"parallel.data_parallel must be one of \('fsdp', 'ddp'\), got 'zero3'"):
        data_parallel(model, None, mode="zero3")


@pytest.mark.dist
def test_dp2_matches_single_process_on_the_concatenated_batch(run_workers):
    out = run_workers(Path(__file__).with_name("dp_worker.py"))
    assert "dp matches single process" in out, out


@pytest.mark.dist
def test_gathered_fsdp_ranks_generate_independently(run_workers):
    out = run_workers(Path(__file__).with_name("gathered_worker.py"))
    assert "gathered ok" in out, out
