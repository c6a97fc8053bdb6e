"""Loss aggregation, GSPO and KL vs float64 references written from REFERENCES.md (verl, TRL, GSPO),
and the layout invariance of the gradient: any micro-batch split, padded or packed."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sailor_engine.kernels.policy_loss import policy_loss
from sailor_engine.rl.config import AlgoConfig
from sailor_engine.rl.loss import (AGG_MODES, LossNorm, aggregate, global_norm, gspo_loss, kl_penalty, rl_loss,
                                   seq_ids_from_cu_seqlens)

NORM_LEN = 16


def make_batch(seed, b=6, t=11, dtype=torch.float64):
    """Padded batch: rows of different response lengths, a prompt prefix (mask 0) and a fully masked row."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)  # ratios well outside the clip range
    ref = logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    lengths = torch.randint(3, t + 1, (b,), generator=g)
    pos = torch.arange(t)
    mask = (pos >= 2) & (pos < lengths[:, None])
    mask[1] = False
    mask[3, 5:7] = False  # a tool response in the middle of a trajectory
    cast = lambda x: x.to(dtype)  # noqa: E731
    return cast(logp), cast(old), cast(ref), cast(adv), mask, lengths


def verl_token_loss(logp, old, adv_tok, eps_low, eps_high, dual_clip=None, clamp=20.0):
    """verl's clipped surrogate as REFERENCES.md states it (float64, per token, unmasked)."""
    ratio = torch.exp((logp - old).clamp(-clamp, clamp))
    loss = torch.maximum(-adv_tok * ratio, -adv_tok * ratio.clamp(1 - eps_low, 1 + eps_high))
    if dual_clip is not None:
        loss = torch.where(adv_tok < 0, torch.minimum(loss, -adv_tok * dual_clip), loss)
    return loss


def trl_token_loss(logp, old, adv_tok, eps, eps_high, beta=0.0, ref=None):
    """TRL: coef = exp(logp - old) unclamped; -min(coef A, clamp(coef) A) + beta k3."""
    coef = torch.exp(logp - old)
    loss = -torch.minimum(coef * adv_tok, coef.clamp(1 - eps, 1 + eps_high) * adv_tok)
    if beta:
        loss = loss + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    return loss


def brute_aggregate(per_token, mask, mode, norm_length=NORM_LEN):
    """One Python loop per sequence over the whole batch."""
    seq_sums, seq_means = [], []
    for row, m in zip(per_token, mask):
        if m.any():
            seq_sums.append(row[m].sum())
            seq_means.append(row[m].mean())
    n_tok, n_seq = int(mask.sum()), len(seq_sums)
    total = sum(seq_sums)
    return {"token-mean": total / n_tok, "seq-mean-token-sum": total / n_seq,
            "seq-mean-token-mean": sum(seq_means) / n_seq,
            "seq-mean-token-sum-norm": total / (n_seq * norm_length)}[mode]


def cfg_for(mode, **kw):
    return AlgoConfig(preset="custom", loss_agg=mode, norm_length=NORM_LEN, **kw)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_matches_verl_convention(mode, dual_clip):
    logp, old, _, adv, mask, _ = make_batch(0)
    logp.requires_grad_(True)
    cfg = cfg_for(mode, dual_clip=dual_clip)
    loss, stats = rl_loss(logp, old, adv, mask, global_norm([mask]), cfg)
    ref_tok = verl_token_loss(logp, old, adv[:, None], 0.2, 0.28, dual_clip)
    expected = brute_aggregate(ref_tok, mask, mode)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    g, = torch.autograd.grad(loss, logp)
    g_ref, = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-15)
    assert int(stats["num_tokens"]) == int(mask.sum())
    # The per-token losses underneath, in fp32 (the kernel's working precision) and float64.
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-6)]:
        per_tok, _ = policy_loss(logp.detach().to(dtype), old.to(dtype), adv.to(dtype), mask, dual_clip=dual_clip)
        torch.testing.assert_close(per_tok.double(), ref_tok.detach() * mask, rtol=tol, atol=tol)


@pytest.mark.parametrize("trl_type, mode", [("dapo", "token-mean"), ("grpo", "seq-mean-token-mean"),
                                            ("dr_grpo", "seq-mean-token-sum-norm")])
def test_matches_trl_convention(trl_type, mode):
    logp, old, ref, adv, mask, _ = make_batch(1)
    mask[1] = True  # TRL divides by every row of the batch: give every row tokens so the counts agree
    cfg = cfg_for(mode, eps_low=0.2, eps_high=0.28, log_ratio_clamp=math.inf, kl_coef=0.04, kl_estimator="k3")
    loss, _ = rl_loss(logp, old, adv, mask, global_norm([mask]), cfg, ref_logp=ref)
    per_tok = trl_token_loss(logp, old, adv[:, None], 0.2, 0.28, beta=0.04, ref=ref) * mask
    kernel_tok, _ = policy_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.04, log_ratio_clamp=math.inf)
    torch.testing.assert_close(kernel_tok, per_tok, rtol=1e-12, atol=1e-14)
    m = mask.double()
    expected = {"dapo": per_tok.sum() / m.sum(),
                "grpo": ((per_tok.sum(-1) / m.sum(-1)).mean()),
                "dr_grpo": per_tok.sum() / (per_tok.shape[0] * NORM_LEN)}[trl_type]
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("split", [[6], [1, 5], [2, 2, 2], [1, 1, 1, 1, 1, 1], [4, 1, 1]])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_gradient_is_independent_of_micro_batching(mode, split, dtype, rtol):
    logp, old, ref, adv, mask, _ = make_batch(2, dtype=dtype)
    cfg = cfg_for(mode, kl_coef=0.1, entropy_coef=0.01)
    ent = (-logp * 0.7).detach()

    def run(parts):
        leaf = logp.clone().requires_grad_(True)
        ent_leaf = ent.clone().requires_grad_(True)
        chunks = list(zip(*(x.split(parts) for x in (leaf, old, ref, adv, mask, ent_leaf))))
        norm = global_norm([c[4] for c in chunks])  # counted before any backward
        total = 0.0
        for lp, o, r, a, m, e in chunks:
            loss, _ = rl_loss(lp, o, a, m, norm, cfg, ref_logp=r, entropy=e * 1.0)
            loss.backward()
            total = total + loss.detach()
        return total, leaf.grad, ent_leaf.grad

    full = run([6])
    got = run(split)
    for a, b in zip(got, full):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * 1e-3)


def test_per_micro_batch_normalisation_would_be_biased():
    """The peer bug this module prevents: a local token-mean scaled by 1/grad_accum differs."""
    logp, old, _, adv, mask, _ = make_batch(3)
    full, _ = rl_loss(logp, old, adv, mask, global_norm([mask]), cfg_for("token-mean"))
    biased = sum(rl_loss(lp, o, a, m, global_norm([m]), cfg_for("token-mean"))[0] / 2
                 for lp, o, a, m in zip(*(x.split(3) for x in (logp, old, adv, mask))))
    assert abs(float(biased - full)) > 1e-3 * abs(float(full))


def _pack(x, lengths):
    return torch.cat([row[:n] for row, n in zip(x, lengths.tolist())])


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_packed_layout_equals_padded(mode, ratio_level):
    logp, old, ref, adv, mask, lengths = make_batch(4)
    cfg = cfg_for(mode, ratio_level=ratio_level, kl_coef=0.05)
    padded = logp.clone().requires_grad_(True)
    loss_p, _ = rl_loss(padded, old, adv, mask, global_norm([mask]), cfg, ref_logp=ref)
    loss_p.backward()
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    seq_ids = seq_ids_from_cu_seqlens(cu)
    packed = _pack(logp, lengths).requires_grad_(True)
    pm = _pack(mask, lengths)
    loss_k, _ = rl_loss(packed, _pack(old, lengths), adv, pm, global_norm([pm], [seq_ids]), cfg,
                        seq_ids=seq_ids, ref_logp=_pack(ref, lengths))
    loss_k.backward()
    torch.testing.assert_close(loss_k, loss_p, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(packed.grad, _pack(padded.grad, lengths), rtol=1e-12, atol=1e-15)


def gspo_reference(logp, old, adv, mask, eps_low, eps_high):
    """GSPO (Zheng et al. 2025): s_i = (pi/pi_old)^(1/|y_i|); J = mean_i min(s_i A_i, clip(s_i) A_i)."""
    terms = []
    for lp, o, a, m in zip(logp, old, adv, mask):
        if m.any():
            s = torch.exp((lp[m] - o[m]).mean())
            terms.append(-torch.minimum(s * a, s.clamp(1 - eps_low, 1 + eps_high) * a))
    return sum(terms) / len(terms)


def test_gspo_matches_sequence_level_objective():
    logp, old, _, adv, mask, _ = make_batch(5)
    old = logp + 0.002 * (old - logp)  # GSPO's clip range is ~1e-4: keep some ratios inside, some out
    cfg = cfg_for("seq-mean-token-mean", ratio_level="sequence", eps_low=3e-4, eps_high=4e-4)
    leaf = logp.clone().requires_grad_(True)
    loss, stats = rl_loss(leaf, old, adv, mask, global_norm([mask]), cfg)
    ref_leaf = logp.clone().requires_grad_(True)
    expected = gspo_reference(ref_leaf, old, adv, mask, 3e-4, 4e-4)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-15)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-10, atol=1e-15)
    assert 0 < float(stats["clip_frac_low"] + stats["clip_frac_high"]) < 1  # both regimes exercised
    assert set(stats) == set(policy_loss(logp, old, adv, mask)[1].as_dict())


def test_gspo_token_equivalence_under_token_mean():
    """GSPO-token: r_it = sg(s_i) * pi(y_t) / sg(pi(y_t)), in verl's per-token loss, token-mean."""
    logp, old, _, adv, mask, _ = make_batch(6)
    old = logp + 0.002 * (old - logp)
    leaf = logp.clone().requires_grad_(True)
    cfg = cfg_for("token-mean", ratio_level="sequence", eps_low=3e-4, eps_high=4e-4)
    rl_loss(leaf, old, adv, mask, global_norm([mask]), cfg)[0].backward()
    ref_leaf = logp.clone().requires_grad_(True)
    m = mask.double()
    log_s = ((ref_leaf - old) * m).sum(-1) / m.sum(-1).clamp(min=1)
    log_r = log_s.detach()[:, None] + ref_leaf - ref_leaf.detach()
    tok = verl_token_loss(log_r, torch.zeros_like(log_r), adv[:, None], 3e-4, 4e-4)
    ((tok * m).sum() / m.sum()).backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_penalty_matches_formula_and_kernel(est):
    logp, _, ref, _, mask, _ = make_batch(7)
    ref = ref.clone()
    ref[0, 3] = logp[0, 3] + 25.0  # exercises the +-20 input clamp and the 10 output clamp
    x = ref - logp
    formula = {"k1": logp - ref, "k2": 0.5 * (logp - ref) ** 2,
               "k3": (torch.exp(x.clamp(-20, 20)) - x.clamp(-20, 20) - 1).clamp(max=10)}[est]
    torch.testing.assert_close(kl_penalty(logp, ref, est), formula, rtol=1e-12, atol=1e-15)
    # The kernel with zero advantages is kl_coef * KL on the unmasked tokens.
    kernel, _ = policy_loss(logp, logp.detach(), torch.zeros(logp.shape[0], dtype=logp.dtype), mask,
                            ref_logp=ref, kl_coef=1.0, kl_estimator=est)
    torch.testing.assert_close(kernel, formula * mask, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(logp, ref, "k4")


def test_entropy_bonus_and_dp_scale():
    logp, old, _, adv, mask, _ = make_batch(8)
    ent = (-logp).requires_grad_(True)
    base, _ = rl_loss(logp, old, adv, mask, global_norm([mask]), cfg_for("token-mean"))
    with_ent, _ = rl_loss(logp, old, adv, mask, global_norm([mask]), cfg_for("token-mean", entropy_coef=0.01),
                          entropy=ent)
    torch.testing.assert_close(with_ent, base - 0.01 * (ent * mask).sum() / mask.sum(), rtol=1e-12, atol=1e-15)
    norm = global_norm([mask])
    scaled = aggregate(logp, mask, LossNorm(norm.num_tokens, norm.num_seqs, 4.0), "token-mean")
    torch.testing.assert_close(scaled, 4 * aggregate(logp, mask, norm, "token-mean"))


def test_global_norm_counts_and_empty_step():
    _, _, _, _, mask, lengths = make_batch(9)
    norm = global_norm([mask[:2], mask[2:]])
    assert (norm.num_tokens, norm.num_seqs, norm.dp_scale) == (int(mask.sum()), int(mask.any(1).sum()), 1.0)
    seq_ids = seq_ids_from_cu_seqlens(torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))
    assert global_norm([_pack(mask, lengths)], [seq_ids]) == norm
    empty = torch.zeros(2, 5, dtype=torch.bool)
    logp = torch.full((2, 5), float("nan"), requires_grad=True)  # masked NaN must not leak
    for mode in AGG_MODES:
        loss = aggregate(logp, empty, global_norm([empty]), mode, norm_length=4)
        loss.backward()
        assert float(loss.detach()) == 0.0 and torch.equal(logp.grad, torch.zeros(2, 5))
        logp.grad = None


def test_bad_input_names_the_field():
    logp, old, ref, adv, mask, _ = make_batch(10)
    norm = global_norm([mask])
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        aggregate(logp, mask, norm, "mean")
    with pytest.raises(ValueError, match="norm_length"):
        aggregate(logp, mask, norm, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="ref_logp is required"):
        rl_loss(logp, old, adv, mask, norm, cfg_for("token-mean", kl_coef=0.1))
    with pytest.raises(ValueError, match="differentiable entropy"):
        rl_loss(logp, old, adv, mask, norm, cfg_for("token-mean", entropy_coef=0.1), entropy=-logp)
    with pytest.raises(ValueError, match="must have one shape"):
        rl_loss(logp, old[:, :-1], adv, mask, norm, cfg_for("token-mean"))
    with pytest.raises(ValueError, match="seq_ids"):
        rl_loss(logp.flatten(), old.flatten(), adv, mask.flatten(), norm, cfg_for("token-mean"))
    with pytest.raises(ValueError, match="seq_ids is required"):
        global_norm([mask.flatten()])
    with pytest.raises(ValueError, match="grad_reduce"):
        global_norm([mask], grad_reduce="avg")
    with pytest.raises(ValueError, match="per-sequence advantages"):
        rl_loss(logp.flatten(), old.flatten(), adv.repeat_interleave(logp.shape[1]), mask.flatten(), norm,
                cfg_for("token-mean", ratio_level="sequence"), seq_ids=torch.arange(6).repeat_interleave(11))


@st.composite
def layouts(draw):
    b, t = draw(st.integers(1, 7)), draw(st.integers(1, 9))
    mask = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b)))
    cuts = sorted(draw(st.sets(st.integers(1, b - 1), max_size=b - 1))) if b > 1 else []
    sizes = [hi - lo for lo, hi in zip([0] + cuts, cuts + [b])]
    return mask, sizes, draw(st.sampled_from(AGG_MODES)), draw(st.sampled_from(["token", "sequence"])), draw(
        st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(layout=layouts())
def test_any_split_any_mask_gives_the_full_batch_gradient(layout):
    mask, sizes, mode, level, seed = layout
    g = torch.Generator().manual_seed(seed)
    b, t = mask.shape
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    old = logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    cfg = cfg_for(mode, ratio_level=level)

    def grad(parts):
        leaf = logp.clone().requires_grad_(True)
        chunks = list(zip(*(x.split(parts) for x in (leaf, old, adv, mask))))
        norm = global_norm([c[3] for c in chunks])
        for lp, o, a, m in chunks:
            rl_loss(lp, o, a, m, norm, cfg)[0].backward()
        return leaf.grad

    torch.testing.assert_close(grad(sizes), grad([b]), rtol=1e-12, atol=1e-15)


def test_gspo_dual_clip_log_ratio_clamp_and_stats():
    logp = torch.zeros(3, 4, dtype=torch.float64)
    old = torch.tensor([[-2.0] * 4, [-0.1] * 4, [-50.0] * 4], dtype=torch.float64)  # s = e^2, e^0.1, e^50
    adv = torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2:] = False
    per_tok, stats = gspo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0, log_ratio_clamp=20.0)
    # A < 0 with s = e^2 > 1 + eps: the unclipped branch -A s = e^2 wins the max, then the dual clip caps it at 3.
    expected = torch.tensor([[3.0] * 4, [-math.exp(0.1)] * 2 + [0.0] * 2, [3.0] * 4], dtype=torch.float64)
    torch.testing.assert_close(per_tok, expected, rtol=1e-15, atol=0)
    assert float(stats["dual_clip_frac"]) == pytest.approx(2 / 3) and float(stats["clip_frac_high"]) == 0.0
    assert float(stats["ratio_max"]) == pytest.approx(math.exp(20.0)) and int(stats["num_tokens"]) == 10


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_bf16_inputs_are_computed_in_fp32(level):
    """bf16 log-probs (what the model emits) give the float64 result of the same bf16 values to fp32 precision."""
    logp, old, ref, adv, mask, _ = make_batch(11, b=6, t=300)
    lo = [x.bfloat16() for x in (logp, old, ref, -logp * 0.5)]
    cfg = cfg_for("seq-mean-token-mean", ratio_level=level, kl_coef=0.1, entropy_coef=0.01)
    norm = global_norm([mask])
    leaf = lo[0].clone().requires_grad_(True)
    ent = lo[3].clone().requires_grad_(True)
    got, _ = rl_loss(leaf, lo[1], adv.float(), mask, norm, cfg, ref_logp=lo[2], entropy=ent)
    exact, _ = rl_loss(*(x.double() for x in lo[:2]), adv, mask, norm, cfg, ref_logp=lo[2].double(),
                       entropy=lo[3].double().requires_grad_(True))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-7)
