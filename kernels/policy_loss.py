"""DUPO / GRPO per-token policy loss: one fused Triton pass for the forward and the backward.

    loss, stats = policy_loss(logp, old_logp, advantages, loss_mask)   # loss: same shape as logp
    (loss.sum() / num_tokens_global).backward()                        # aggregation is the caller's

Per unmasked token, with r = exp(clamp(logp - old_logp, +-log_ratio_clamp)):

    L = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))     (clip-higher, DAPO / verl)
    A < 0 and dual_clip = c:  L = min(L, -A c)                (dual clip)
    loss = L + kl_coef KL(logp, ref_logp)                     (KL k1 / k2 / k3, verl's clamps)

Masked tokens (loss_mask == 0) give exactly 0 loss and 0 gradient, whatever their inputs hold
(inf / NaN included: selected away with where, never multiplied by 0). The gradient flows to logp only;
old_logp, advantages and ref_logp are constants (they get no gradient even if they require one).

Why fused: the eager formula reads and writes N-sized tensors some twenty times and saves a
dozen of them for backward. Here the forward kernel reads each input once and writes the loss
and d loss / d logp (fp32); backward is one multiply by grad_out. Byte model per token, bf16
inputs, per-token advantages, bool mask: forward reads 2+2+2+1 (+2 ref) and writes 4+4, backward
reads 4 (grad_out; 0 when it is an expanded scalar) + 4 + 1 (mask) and writes 2. Recomputing in
backward instead would read the inputs twice: 24 B/token vs 26 for bf16, but 38 vs 34 for fp32.
Without grad (no_grad, or logp not requiring it) the forward writes the loss only.

Implementations: `impl="triton"` (CUDA; also CPU tensors under TRITON_INTERPRET=1, which is how
the tests run it), `impl="torch"` (the same algorithm in PyTorch: the CPU path), `impl="auto"`
(Triton on CUDA, PyTorch elsewhere; float64 inputs always take the PyTorch path, which computes
in float64, while the kernel computes in fp32). The loss is fp32 (float64 for float64 inputs).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._launch import interpreting as _interpreting
from ._launch import on_device as _on

_KL_ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3}
_NUM_PARTIALS = 8  # per-block stat partials: n, n_low, n_high, n_dual, sum_r, max_r, sum_kl, pad
_CPU_CHUNK = 1 << 14  # tokens per chunk of the PyTorch path: ~20 temporaries x 64 KiB stay in L2


@dataclass(frozen=True)
class PolicyLossStats:
    """Detached 0-dim tensors over the unmasked tokens only (0 when there are none); no host sync.

    A clip counts when its branch is selected *and binds*, i.e. the token's policy-gradient is
    zero because of it. To combine micro-batches, weight the means by num_tokens.
    """

    num_tokens: torch.Tensor  # int64: unmasked tokens
    clip_frac_low: torch.Tensor  # A < 0 and r < 1 - eps_low
    clip_frac_high: torch.Tensor  # A > 0 and r > 1 + eps_high
    dual_clip_frac: torch.Tensor  # A < 0 and r > dual_clip (0 without dual clip)
    ratio_mean: torch.Tensor  # mean of r (after the log-ratio clamp)
    ratio_max: torch.Tensor
    kl_mean: torch.Tensor  # mean KL estimate (0 without ref_logp), also when kl_coef == 0

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class _Config:
    lo: float  # 1 - eps_low
    hi: float  # 1 + eps_high
    dual_clip: float | None
    kl_coef: float
    kl_estimator: int  # 1, 2, 3
    log_ratio_clamp: float


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

# k3 = e^x - 1 - x = x^2 * sum_j x^j / (j + 2)! for |x| < 1: Horner coefficients, highest first.
# Truncated at j = 9 (fp32) / j = 17 (fp64), the next term is below the dtype's rounding; beyond
# |x| = 1 the direct formula loses at most ~2 bits to cancellation.
_K3_COEFS = {dt: tuple(1.0 / math.factorial(j + 2) for j in range(last, -1, -1))
             for dt, last in ((torch.float32, 9), (torch.float64, 17))}


@triton.jit
def _exp(x, EXACT_EXP: tl.constexpr):
    # tl.exp lowers to ex2.approx(x * log2(e)) on NVIDIA: ~1e-6 relative error at |x| = 20.
    # libdevice's expf is within 1 ulp. The interpreter has no libdevice; its tl.exp is numpy's.
    if EXACT_EXP:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _k3_and_expm1(x, EXACT_EXP: tl.constexpr):
    """(e^x - 1 - x, e^x - 1) to fp32 rounding for any x: a series near 0, where both cancel."""
    small = tl.abs(x) < 1.0
    xs = tl.where(small, x, 0.0)
    p = 1.0 / 39916800.0  # 1/11!
    p = p * xs + 1.0 / 3628800.0
    p = p * xs + 1.0 / 362880.0
    p = p * xs + 1.0 / 40320.0
    p = p * xs + 1.0 / 5040.0
    p = p * xs + 1.0 / 720.0
    p = p * xs + 1.0 / 120.0
    p = p * xs + 1.0 / 24.0
    p = p * xs + 1.0 / 6.0
    p = p * xs + 0.5
    k3_small = xs * xs * p
    em1 = tl.where(small, xs + k3_small, _exp(x, EXACT_EXP) - 1.0)
    return tl.where(small, k3_small, em1 - x), em1


@triton.jit
def _policy_loss_fwd_kernel(
    logp_ptr,  # [N] current-policy log-probs (fp16 / bf16 / fp32)
    old_ptr,  # [N] behaviour-policy log-probs
    adv_ptr,  # [N] per-token advantages, or [N // T] per-sequence (ADV_PER_SEQ)
    mask_ptr,  # [N] loss mask, nonzero = policy token (bool / int / float)
    ref_ptr,  # [N] reference-policy log-probs (read only if HAS_REF)
    loss_ptr,  # [N] out: per-token loss, fp32
    dlogp_ptr,  # [N] out: d loss / d logp, fp32 (written only if WRITE_GRAD)
    part_ptr,  # [num_blocks, 8] out: per-block stat partials, fp32
    N,  # number of tokens
    T,  # tokens per advantage (the sequence length) when ADV_PER_SEQ
    lo,  # 1 - eps_low
    hi,  # 1 + eps_high
    dual_c,  # dual-clip constant (read only if DUAL_CLIP)
    max_log_ratio,  # clamp of logp - old_logp, may be inf
    kl_coef,  # weight of the KL term in the loss (read only if KL_IN_LOSS)
    ADV_PER_SEQ: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    HAS_REF: tl.constexpr,
    KL_IN_LOSS: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr,  # 1, 2, 3 for k1, k2, k3
    WRITE_GRAD: tl.constexpr,
    EXACT_EXP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    m = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
    # Masked lanes compute on zeros (where, not multiply), so inf / NaN there cannot leak into the
    # result. The loads use the bounds mask only: a data-dependent mask would split them into
    # scalar 2-byte loads, while masked tokens, interleaved with the others, save no sectors.
    logp = tl.where(m, tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
    old = tl.where(m, tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
    if ADV_PER_SEQ:
        a = tl.load(adv_ptr + offs // T, mask=inb, other=0.0)
    else:
        a = tl.load(adv_ptr + offs, mask=inb, other=0.0)
    a = tl.where(m, a.to(tl.float32), 0.0)

    # Ratio; where() rather than min/max so that NaN propagates as in torch.clamp. The clamp's
    # gradient passes on the closed interval, as torch.clamp's does.
    d = logp - old
    dc = tl.where(d > max_log_ratio, max_log_ratio, tl.where(d < -max_log_ratio, -max_log_ratio, d))
    r = _exp(dc, EXACT_EXP)
    dr = tl.where(tl.abs(d) > max_log_ratio, 0.0, r)  # (not <=: a NaN log-ratio stays loud)

    # max(-A r, -A clip(r)) selects the clipped branch, with a zero gradient, exactly when it binds;
    # elsewhere both branches equal -A r (bitwise: -A clip(r) is then -A r or the smaller side).
    bind_hi = (a > 0) & (r > hi)
    bind_lo = (a < 0) & (r < lo)
    loss = tl.where(bind_hi, -a * hi, tl.where(bind_lo, -a * lo, -a * r))
    frozen = bind_hi | bind_lo
    if DUAL_CLIP:
        bind_dual = (a < 0) & (r > dual_c)
        loss = tl.where(bind_dual, -a * dual_c, loss)
        frozen = frozen | bind_dual
    grad = tl.where(frozen, 0.0, -a * dr)

    kl = tl.zeros_like(loss)
    if HAS_REF:
        ref = tl.where(m, tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
        if KL_ESTIMATOR == 1:
            kl = logp - ref
            dkl = tl.full(kl.shape, 1.0, tl.float32)
        elif KL_ESTIMATOR == 2:
            kl = 0.5 * (logp - ref) * (logp - ref)
            dkl = logp - ref
        else:
            # verl's low-variance KL: x clamped to +-20, k3 to +-10 (k3 >= 0: only the top binds).
            x = ref - logp
            k3, em1 = _k3_and_expm1(tl.where(x > 20.0, 20.0, tl.where(x < -20.0, -20.0, x)), EXACT_EXP)
            dkl = tl.where((tl.abs(x) > 20.0) | (k3 > 10.0), 0.0, -em1)
            kl = tl.where(k3 > 10.0, 10.0, k3)
        if KL_IN_LOSS:
            loss = loss + kl_coef * kl
            grad = grad + kl_coef * dkl

    tl.store(loss_ptr + offs, tl.where(m, loss, 0.0), mask=inb)
    if WRITE_GRAD:
        tl.store(dlogp_ptr + offs, tl.where(m, grad, 0.0), mask=inb)

    one = tl.where(m, 1.0, 0.0)
    part = part_ptr + pid * 8
    tl.store(part + 0, tl.sum(one, axis=0))
    tl.store(part + 1, tl.sum(tl.where(m & bind_lo, 1.0, 0.0), axis=0))
    tl.store(part + 2, tl.sum(tl.where(m & bind_hi, 1.0, 0.0), axis=0))
    if DUAL_CLIP:
        tl.store(part + 3, tl.sum(tl.where(m & bind_dual, 1.0, 0.0), axis=0))
    else:
        tl.store(part + 3, 0.0)
    tl.store(part + 4, tl.sum(tl.where(m, r, 0.0), axis=0))
    tl.store(part + 5, tl.max(tl.where(m, r, 0.0), axis=0))
    tl.store(part + 6, tl.sum(tl.where(m, kl, 0.0), axis=0))


@triton.jit
def _policy_loss_stats_kernel(
    part_ptr,  # [num_blocks, 8] per-block partials from the forward kernel, fp32
    stats_ptr,  # [6] out: clip_frac_low, clip_frac_high, dual_clip_frac, ratio_mean, ratio_max, kl_mean
    count_ptr,  # [1] out: unmasked tokens, int64
    num_blocks,
    BLOCK: tl.constexpr,
):
    # One program. Counts are summed as integers and sums in fp64, so the totals are exact
    # (counts) or fp64-rounded (sums) whatever the number of tokens; deterministic, no atomics.
    n = tl.zeros([BLOCK], tl.int64)
    n_lo = tl.zeros([BLOCK], tl.int64)
    n_hi = tl.zeros([BLOCK], tl.int64)
    n_dual = tl.zeros([BLOCK], tl.int64)
    sum_r = tl.zeros([BLOCK], tl.float64)
    max_r = tl.zeros([BLOCK], tl.float32)
    sum_kl = tl.zeros([BLOCK], tl.float64)
    for start in range(0, num_blocks, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        p = part_ptr + rows.to(tl.int64) * 8
        ok = rows < num_blocks
        n += tl.load(p + 0, mask=ok, other=0.0).to(tl.int64)
        n_lo += tl.load(p + 1, mask=ok, other=0.0).to(tl.int64)
        n_hi += tl.load(p + 2, mask=ok, other=0.0).to(tl.int64)
        n_dual += tl.load(p + 3, mask=ok, other=0.0).to(tl.int64)
        sum_r += tl.load(p + 4, mask=ok, other=0.0).to(tl.float64)
        max_r = tl.maximum(max_r, tl.load(p + 5, mask=ok, other=0.0))
        sum_kl += tl.load(p + 6, mask=ok, other=0.0).to(tl.float64)
    total = tl.sum(n, axis=0)
    denom = tl.maximum(total, 1).to(tl.float64)
    tl.store(count_ptr, total)
    tl.store(stats_ptr + 0, (tl.sum(n_lo, axis=0).to(tl.float64) / denom).to(tl.float32))
    tl.store(stats_ptr + 1, (tl.sum(n_hi, axis=0).to(tl.float64) / denom).to(tl.float32))
    tl.store(stats_ptr + 2, (tl.sum(n_dual, axis=0).to(tl.float64) / denom).to(tl.float32))
    tl.store(stats_ptr + 3, (tl.sum(sum_r, axis=0) / denom).to(tl.float32))
    tl.store(stats_ptr + 4, tl.max(max_r, axis=0))
    tl.store(stats_ptr + 5, (tl.sum(sum_kl, axis=0) / denom).to(tl.float32))


@triton.jit
def _fp32_to_bf16_rtne(x):
    """fp32 -> bf16, round to nearest even, as the GPU's cvt.rn does; written out in integer ops
    because the interpreter's cast truncates instead."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _policy_loss_bwd_kernel(
    grad_out_ptr,  # [N] d objective / d loss (any float dtype; stride 0 for an expanded scalar)
    stride_go,  # grad_out's element stride
    dlogp_ptr,  # [N] d loss / d logp saved by the forward, fp32
    mask_ptr,  # [N] loss mask
    grad_ptr,  # [N] out: d objective / d logp, in logp's dtype
    N,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    m = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
    # where, not multiply: a masked token's gradient is 0 even if grad_out is inf / NaN there.
    go = tl.load(grad_out_ptr + offs * stride_go, mask=inb, other=0.0).to(tl.float32)
    d = tl.load(dlogp_ptr + offs, mask=inb, other=0.0)
    grad = tl.where(m, go * d, 0.0)
    if grad_ptr.dtype.element_ty == tl.bfloat16:
        grad = _fp32_to_bf16_rtne(grad)
    tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=inb)


# ---------------------------------------------------------------------------------------------
# PyTorch path: the kernel's algorithm, op for op (the CPU implementation)
# ---------------------------------------------------------------------------------------------


def _k3_and_expm1_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    small = x.abs() < 1.0
    xs = torch.where(small, x, 0.0)
    coefs = _K3_COEFS[x.dtype]
    p = torch.full_like(x, coefs[0])
    for c in coefs[1:]:
        p = p * xs + c
    k3_small = xs * xs * p
    em1 = torch.where(small, xs + k3_small, torch.exp(x) - 1.0)
    return torch.where(small, k3_small, em1 - x), em1


def _kl_torch(logp: torch.Tensor, ref: torch.Tensor, estimator: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL estimate, d KL / d logp) per token."""
    if estimator == 1:
        return logp - ref, torch.ones_like(logp)
    if estimator == 2:
        return 0.5 * (logp - ref) * (logp - ref), logp - ref
    x = ref - logp
    k3, em1 = _k3_and_expm1_torch(x.clamp(-20.0, 20.0))
    dkl = torch.where((x.abs() > 20.0) | (k3 > 10.0), 0.0, -em1)
    return k3.clamp(max=10.0), dkl


def _forward_torch(logp, old_logp, adv, mask, ref_logp, cfg: _Config, compute: torch.dtype, adv_per_seq: int,
                   write_grad: bool):
    """Flat (N,) inputs (adv: (N,) or (N // adv_per_seq,)); same returns as _forward_triton.

    Chunks of _CPU_CHUNK tokens, like the kernel's blocks: the temporaries stay in cache and take
    O(chunk) memory, whatever N; per-chunk stat partials are combined as the kernels do.
    """
    n = logp.numel()
    loss = torch.empty(n, dtype=compute, device=logp.device)
    grad = torch.empty(n, dtype=compute, device=logp.device) if write_grad else None
    parts = [torch.zeros(_NUM_PARTIALS - 1, dtype=compute, device=logp.device)]
    for s in range(0, n, _CPU_CHUNK):
        e = min(n, s + _CPU_CHUNK)
        if adv_per_seq:
            a = adv.index_select(0, torch.arange(s, e, device=adv.device) // adv_per_seq)
        else:
            a = adv[s:e]
        parts.append(_chunk_torch(logp[s:e], old_logp[s:e], a, mask[s:e], None if ref_logp is None else ref_logp[s:e],
                                  cfg, compute, loss[s:e], None if grad is None else grad[s:e]))
    part = torch.stack(parts).to(torch.float64)  # counts exact, sums fp64-rounded
    count = part[:, 0].sum().to(torch.int64)
    means = part[:, 1:].sum(0) / count.clamp(min=1)
    stats = torch.cat([means[:4], part[:, 5].amax().view(1), means[5:]]).to(compute)
    return loss, grad, stats, count


def _chunk_torch(logp, old_logp, adv, mask, ref_logp, cfg: _Config, compute: torch.dtype, loss_out, grad_out):
    """One chunk of the kernel's algorithm, op for op: writes loss_out and grad_out (if given),
    returns the stat partials (n, n_low, n_high, n_dual, sum_r, max_r, sum_kl)."""
    # Masked tokens are not sanitised first (torch.where is slow on CPU): everything here is
    # elementwise and closed-form (no autograd), and the last where()s drop whatever inf / NaN
    # they produced.
    m = mask != 0
    zero = torch.zeros((), dtype=compute, device=logp.device)
    lp, a = logp.to(compute), adv.to(compute)
    c = cfg.log_ratio_clamp
    d = lp - old_logp.to(compute)
    r = torch.exp(d.clamp(-c, c))
    bind_hi = (a > 0) & (r > cfg.hi)
    bind_lo = (a < 0) & (r < cfg.lo)
    ratio = torch.where(bind_hi, cfg.hi, torch.where(bind_lo, cfg.lo, r))  # the selected branch's
    frozen = bind_hi | bind_lo | (d.abs() > c)  # zero gradient (a NaN log-ratio stays loud)
    bind_dual = torch.zeros_like(m)
    if cfg.dual_clip is not None:
        bind_dual = (a < 0) & (r > cfg.dual_clip)
        ratio = torch.where(bind_dual, cfg.dual_clip, ratio)
        frozen = frozen | bind_dual
    loss = -a * ratio
    grad = torch.where(frozen, zero, -a * r) if grad_out is not None else None
    kl_sum = zero
    if ref_logp is not None:
        kl, dkl = _kl_torch(lp, ref_logp.to(compute), cfg.kl_estimator)
        if cfg.kl_coef != 0.0:
            loss = loss + cfg.kl_coef * kl
            grad = grad + cfg.kl_coef * dkl if grad is not None else None
        kl_sum = torch.where(m, kl, zero).sum()
    torch.where(m, loss, zero, out=loss_out)
    if grad_out is not None:
        torch.where(m, grad, zero, out=grad_out)
    r_masked = torch.where(m, r, zero)
    counts = torch.stack([torch.count_nonzero(b) for b in (m, bind_lo & m, bind_hi & m, bind_dual & m)]).to(compute)
    return torch.cat([counts, torch.stack([r_masked.sum(), r_masked.max(), kl_sum])])


# ---------------------------------------------------------------------------------------------
# Triton launchers
# ---------------------------------------------------------------------------------------------


def _block(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps): 16 elements per thread for big N; the interpreter wants few, big blocks."""
    if _interpreting():
        return min(4096, triton.next_power_of_2(max(n, 16))), 4
    return (4096, 8) if n >= (1 << 20) else (1024, 4)


def _forward_triton(logp, old_logp, adv, mask, ref_logp, cfg: _Config, adv_per_seq: int, write_grad: bool):
    """Flat (N,) inputs (adv: (N,) or (N // adv_per_seq,)). Same returns as _forward_torch."""
    n = logp.numel()
    block, warps = _block(n)
    num_blocks = triton.cdiv(n, block)
    loss = torch.empty(n, dtype=torch.float32, device=logp.device)
    grad = torch.empty(n, dtype=torch.float32, device=logp.device) if write_grad else loss
    part = torch.empty((num_blocks, _NUM_PARTIALS), dtype=torch.float32, device=logp.device)
    _policy_loss_fwd_kernel[(num_blocks,)](
        logp, old_logp, adv, mask, logp if ref_logp is None else ref_logp, loss, grad, part,
        n, max(adv_per_seq, 1), cfg.lo, cfg.hi, cfg.dual_clip or 0.0, cfg.log_ratio_clamp, cfg.kl_coef,
        ADV_PER_SEQ=adv_per_seq > 0, DUAL_CLIP=cfg.dual_clip is not None, HAS_REF=ref_logp is not None,
        KL_IN_LOSS=ref_logp is not None and cfg.kl_coef != 0.0, KL_ESTIMATOR=cfg.kl_estimator,
        WRITE_GRAD=write_grad, EXACT_EXP=not _interpreting(), BLOCK=block, num_warps=warps,
    )
    stats = torch.empty(6, dtype=torch.float32, device=logp.device)
    count = torch.empty((), dtype=torch.int64, device=logp.device)
    _policy_loss_stats_kernel[(1,)](part, stats, count, num_blocks, BLOCK=1024, num_warps=4)
    return loss, grad if write_grad else None, stats, count


def _backward_triton(grad_out: torch.Tensor, dlogp: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype):
    n = dlogp.numel()
    go = grad_out.reshape(-1)  # a view with stride 0 when grad_out is an expanded scalar
    grad = torch.empty(n, dtype=dtype, device=dlogp.device)
    block, warps = _block(n)
    _policy_loss_bwd_kernel[(triton.cdiv(n, block),)](go, go.stride(0), dlogp, mask, grad, n,
                                                      BLOCK=block, num_warps=warps)
    return grad


# ---------------------------------------------------------------------------------------------
# autograd.Function and the public function
# ---------------------------------------------------------------------------------------------


class _PolicyLoss(torch.autograd.Function):
    """Forward writes the loss and d loss / d logp in one pass; backward multiplies by grad_out."""

    @staticmethod
    def forward(ctx, logp, old_logp, adv, mask, ref_logp, cfg: _Config, compute: torch.dtype, use_triton: bool,
                adv_per_seq: int):
        write_grad = ctx.needs_input_grad[0]
        if use_triton:
            loss, dlogp, stats, count = _forward_triton(logp, old_logp, adv, mask, ref_logp, cfg, adv_per_seq,
                                                        write_grad)
        else:
            loss, dlogp, stats, count = _forward_torch(logp, old_logp, adv, mask, ref_logp, cfg, compute,
                                                       adv_per_seq, write_grad)
        ctx.mark_non_differentiable(stats, count)
        ctx.use_triton, ctx.logp_dtype = use_triton, logp.dtype
        if write_grad:
            ctx.save_for_backward(dlogp, mask)
        return loss, stats, count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_stats, _grad_count):
        dlogp, mask = ctx.saved_tensors
        if ctx.use_triton:
            with _on(dlogp.device):
                grad = _backward_triton(grad_loss, dlogp, mask, ctx.logp_dtype)
        else:
            grad = torch.where(mask != 0, grad_loss * dlogp, 0.0).to(ctx.logp_dtype)
        return grad, None, None, None, None, None, None, None, None


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    log_ratio_clamp: float = 20.0,
    impl: str = "auto",
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Per-token clipped policy-gradient loss with optional dual clip and KL penalty.

    logp: (..., T) log-probs of the sampled tokens under the current policy (the only input that
        receives a gradient). old_logp, loss_mask, ref_logp: same shape as logp.
    advantages: same shape as logp (per token), or logp.shape[:-1] / (*logp.shape[:-1], 1) (one
        per sequence, broadcast over the last dim; for 1-D logp: a 0-dim or (1,) tensor).
    loss_mask: bool / int / float; a token is in the loss iff its mask is nonzero (weights belong
        in the aggregation, not here).
    eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high]. dual_clip: c > 1, for A < 0.
    ref_logp, kl_coef, kl_estimator: KL penalty "k1" | "k2" | "k3"; with kl_coef == 0 the KL is
        still reported in stats when ref_logp is given.
    log_ratio_clamp: clamp of logp - old_logp before exp (verl: 20; TRL: none, pass math.inf).
    impl: "auto" | "triton" | "torch" (see the module docstring).

    Returns per_token_loss (same shape as logp; fp32, or float64 for float64 inputs; exactly 0 at
    masked tokens) and PolicyLossStats, without synchronising with the device.
    """
    adv_per_seq = _check_inputs(logp, old_logp, advantages, loss_mask, ref_logp, eps_low, eps_high, dual_clip,
                                kl_coef, kl_estimator, log_ratio_clamp, impl)
    compute = torch.float32
    if any(t is not None and t.dtype == torch.float64 for t in (logp, old_logp, advantages, ref_logp)):
        compute = torch.float64
    use_triton = impl == "triton" or (impl == "auto" and logp.is_cuda and compute == torch.float32)
    if use_triton and compute == torch.float64:
        raise ValueError("policy_loss: impl='triton' computes in fp32; float64 inputs need impl='torch' or 'auto'")
    if use_triton and not (logp.is_cuda or _interpreting()):
        raise ValueError("policy_loss: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
    cfg = _Config(lo=1.0 - eps_low, hi=1.0 + eps_high, dual_clip=None if dual_clip is None else float(dual_clip),
                  kl_coef=float(kl_coef), kl_estimator=_KL_ESTIMATORS[kl_estimator],
                  log_ratio_clamp=float(log_ratio_clamp))

    use_triton = use_triton and logp.numel() > 0
    flat = lambda t: None if t is None else t.reshape(-1).contiguous()  # noqa: E731
    args = (flat(logp), flat(old_logp), flat(advantages), flat(loss_mask), flat(ref_logp))
    # Triton launches on the current CUDA device: make it logp's.
    with _on(logp.device):
        loss, stats, count = _PolicyLoss.apply(*args, cfg, compute, use_triton, adv_per_seq)
    return loss.view(logp.shape), PolicyLossStats(count, *stats.unbind(0))


def _check_inputs(logp, old_logp, advantages, loss_mask, ref_logp, eps_low, eps_high, dual_clip, kl_coef,
                  kl_estimator, log_ratio_clamp, impl) -> int:
    """Raise a clear error naming the argument; return T for per-sequence advantages, else 0."""
    named = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "loss_mask": loss_mask}
    if ref_logp is not None:
        named["ref_logp"] = ref_logp
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"policy_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
        if name == "loss_mask" and t.is_complex() or name != "loss_mask" and not t.is_floating_point():
            raise TypeError(f"policy_loss: {name} must be a {'real' if name == 'loss_mask' else 'floating-point'} "
                            f"tensor, got {t.dtype}")
        if t.device != logp.device:
            raise ValueError(f"policy_loss: {name} is on {t.device} but logp is on {logp.device}")
    scalars = {"eps_low": eps_low, "eps_high": eps_high, "dual_clip": dual_clip, "kl_coef": kl_coef,
               "log_ratio_clamp": log_ratio_clamp}
    for name, v in scalars.items():
        if not (isinstance(v, numbers.Real) and not isinstance(v, bool) or v is None and name == "dual_clip"):
            raise TypeError(f"policy_loss: {name} must be a Python number, got {type(v).__name__}")
    if logp.dim() == 0:
        raise ValueError("policy_loss: logp must have at least one dim (tokens), got a 0-dim tensor")
    shape = tuple(logp.shape)
    for name in ("old_logp", "loss_mask", "ref_logp"):
        if name in named and tuple(named[name].shape) != shape:
            raise ValueError(f"policy_loss: {name} has shape {tuple(named[name].shape)}, expected {shape} (as logp)")
    adv_shape = tuple(advantages.shape)
    if adv_shape != shape and adv_shape not in (shape[:-1], shape[:-1] + (1,)):
        raise ValueError(f"policy_loss: advantages has shape {adv_shape}; expected {shape} (per token) or "
                         f"{shape[:-1]} / {shape[:-1] + (1,)} (per sequence)")
    if not 0.0 <= eps_low <= 1.0:
        raise ValueError(f"policy_loss: eps_low must be in [0, 1], got {eps_low}")
    if not 0.0 <= eps_high < math.inf:
        raise ValueError(f"policy_loss: eps_high must be finite and >= 0, got {eps_high}")
    if dual_clip is not None and not 1.0 < dual_clip < math.inf:
        raise ValueError(f"policy_loss: dual_clip must be None or a finite value > 1, got {dual_clip}")
    if kl_estimator not in _KL_ESTIMATORS:
        raise ValueError(f"policy_loss: kl_estimator must be one of {sorted(_KL_ESTIMATORS)}, got {kl_estimator!r}")
    if not 0.0 <= kl_coef < math.inf:
        raise ValueError(f"policy_loss: kl_coef must be finite and >= 0, got {kl_coef}")
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("policy_loss: kl_coef > 0 needs ref_logp")
    if not log_ratio_clamp > 0.0:
        raise ValueError(f"policy_loss: log_ratio_clamp must be > 0 (math.inf for none), got {log_ratio_clamp}")
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"policy_loss: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    return shape[-1] if adv_shape != shape else 0
