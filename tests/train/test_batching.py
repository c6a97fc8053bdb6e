"""Packing: FFD bins against a plain-Python FFD and brute-force optimal packings; pack() layout."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sailor_engine.train.batching import Sequence, ffd_bins, ffd_split, pack, split_by_tokens


def python_ffd(lengths, capacity):
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free, bins = [], {}
    for i in order:
        b = next((b for b, f in enumerate(free) if f >= lengths[i]), None)
        if b is None:
            free.append(capacity)
            b = len(free) - 1
        free[b] -= lengths[i]
        bins.setdefault(b, []).append(i)
    return [sorted(bins[b]) for b in range(len(free))]


def optimal_bins(lengths, capacity):
    """Fewest bins, by trying every assignment (tiny inputs only)."""
    n = len(lengths)
    for k in range(1, n + 1):
        for assign in itertools.product(range(k), repeat=n):
            load = [0] * k
            for i, b in enumerate(assign):
                load[b] += lengths[i]
            if max(load) <= capacity:
                return k
    return n


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 50), max_size=60), st.integers(1, 60))
def test_ffd_matches_plain_python_and_respects_capacity(lengths, capacity):
    bins = ffd_bins(lengths, capacity)
    assert bins == python_ffd(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert sum(lengths[i] for i in b) <= capacity or len(b) == 1  # only an oversized item overflows


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=1, max_size=6), st.integers(10, 16))
def test_ffd_within_its_worst_case_bound_of_optimal(lengths, capacity):
    opt = optimal_bins(lengths, capacity)
    assert opt >= math.ceil(sum(lengths) / capacity)
    assert len(ffd_bins(lengths, capacity)) <= 11 / 9 * opt + 6 / 9


def test_ffd_split_packs_tighter_than_in_order():
    seqs = [Sequence(list(range(n + 1)), [1] * (n + 1)) for n in (60, 50, 40, 50, 10, 40, 20, 30)]
    assert len(ffd_split(seqs, 100)) == 3 < len(split_by_tokens(seqs, 100)) == 4
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        ffd_bins([1], 0)
    assert ffd_bins([], 5) == []


def test_pack_layout():
    a = Sequence([5, 6, 7], [0, 1, 1], [0.0, -0.5, -0.25])
    b = Sequence([8, 9], [0, 1], [0.0, -1.0])
    p = pack([a, b])
    assert p.input_ids.tolist() == [5, 6, 8] and p.targets.tolist() == [6, 7, 9]
    assert p.loss_mask.tolist() == [1, 1, 1] and p.old_logp.tolist() == [-0.5, -0.25, -1.0]
    assert p.cu_seqlens.tolist() == [0, 2, 3] and p.seq_ids.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="at least 2 tokens"):
        pack([Sequence([1], [0])])
    assert pack([a, Sequence([1, 2], [0, 1])]).old_logp is None and isinstance(p.input_ids, torch.Tensor)


def test_loss_targets_skip_the_rows_without_loss_and_keep_the_loss_and_its_gradients():
    """The trainers hand fused_linear_logprob `loss_targets` (ignore_index off the loss mask), so the
    LM head runs on policy tokens only: the same log-probs there, 0 elsewhere, and the same loss and
    gradients as the full head (float64: any gap would be a real difference, not rounding)."""
    from sailor_engine.kernels.logprob import fused_linear_logprob
    from sailor_engine.parallel.data import rft_loss
    from sailor_engine.rl.loss import global_norm

    g = torch.Generator().manual_seed(0)
    seqs = [Sequence(torch.randint(0, 11, (n,), generator=g).tolist(), m)
            for n, m in ((6, [0, 0, 1, 1, 0, 1]), (4, [0, 0, 0, 1]), (5, [0, 0, 0, 0, 0]))]
    p = pack(seqs)
    on = p.loss_mask != 0
    assert torch.equal(p.loss_targets[on], p.targets[on]) and bool((p.loss_targets[~on] == -100).all())
    norm = global_norm([p.loss_mask], [p.seq_ids])
    w = torch.randn(11, 8, generator=g, dtype=torch.float64)
    h = torch.randn(p.num_tokens, 8, generator=g, dtype=torch.float64)
    grads = []
    for targets in (p.targets, p.loss_targets):
        wi, hi = w.clone().requires_grad_(), h.clone().requires_grad_()
        logp = fused_linear_logprob(hi, wi, targets, impl="torch")
        loss = rft_loss(logp, p.loss_mask, norm)
        loss.backward()
        grads.append((logp.detach(), loss.detach(), wi.grad, hi.grad))
    (full, lf, gw_f, gh_f), (mine, lm, gw_m, gh_m) = grads
    torch.testing.assert_close(mine[on], full[on], rtol=0, atol=1e-12)
    assert torch.equal(mine[~on], torch.zeros_like(mine[~on]))
    torch.testing.assert_close(lm, lf, rtol=0, atol=1e-12)
    torch.testing.assert_close(gw_m, gw_f, rtol=0, atol=1e-12)
    torch.testing.assert_close(gh_m, gh_f, rtol=0, atol=1e-12)
    assert torch.equal(gh_m[~on], torch.zeros_like(gh_m[~on]))
