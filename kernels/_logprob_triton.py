"""Triton kernels for fused_linear_logprob (see kernels/logprob.py for the design and the numerics).

Two kernels share one logits-tile routine (a tl.dot loop over H, fp32 accumulation):

- `_logprob_fwd_kernel`: grid (vocab splits, row blocks). Each program walks its share of the vocab
  tiles with an online log-sum-exp and writes partial statistics (max, sum-exp, entropy term,
  target logit) for its rows; logprob.py merges the splits (and the tensor-parallel ranks) exactly.
  Splits are the fast grid axis: a wave of P programs then holds ~S weight tiles and ~P/S hidden
  blocks, not P hidden blocks (132 MiB at H=4096, BLOCK_N=128 on an H100: past L2, re-read from
  HBM for every vocab tile). S ~ sqrt(P) keeps both in L2.
- `_logprob_bwd_kernel`: 1-D grid over (row block, vocab tile) pairs of one row chunk, grouped
  GROUP_N row blocks at a time (the usual GEMM swizzle) for the same L2 reason. Each program
  recomputes its logits tile and writes d(logp)/d(raw logits) = g * (onehot - p) / T in the input
  dtype; cuBLAS then does dH = dz @ W and dW += dz^T @ H.

Only launch helpers are public to logprob.py; nothing here validates inputs (the caller does).
Under TRITON_INTERPRET=1 the kernels run on CPU tensors with one config and fp32 dot operands
(the interpreter cannot do bf16 arithmetic; bf16 x bf16 products are exact in fp32, so only the
summation order differs from the tensor-core path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import interpreting as _interpreting
from ._launch import on_device as _on

# Finite stand-in for -inf on masked vocab lanes: exp(SENTINEL - m) underflows to exactly 0 for any
# real max m, while -inf would give (-inf) - (-inf) = NaN on rows whose tiles are all masked.
_SENTINEL = tl.constexpr(-1e30)


def _configs(gpu: list[triton.Config], interp: triton.Config) -> list[triton.Config]:
    # The interpreter cannot benchmark: give it exactly one (small) config.
    return [interp] if _interpreting() else gpu


_FWD_CONFIGS = _configs(
    [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": 64}, num_warps=w, num_stages=s)
        for bn, bv, w, s in [(128, 128, 8, 3), (128, 256, 8, 3), (64, 256, 4, 4), (128, 128, 4, 4), (64, 128, 4, 4)]
    ],
    triton.Config({"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_H": 32}),
)
_BWD_CONFIGS = _FWD_CONFIGS


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr,  # hidden (N, H), weight (V, H), bias (V,) or a dummy
    rows, cols,  # [BLOCK_N], [BLOCK_V] int64 indices
    row_mask, col_mask,  # [BLOCK_N], [BLOCK_V]
    H, stride_hn, stride_wv,  # hidden width; row strides (the H dim is contiguous)
    inv_t,  # 1 / temperature (fp32)
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast operands before tl.dot (fp32 inputs; the interpreter)
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32", for fp32 operands
):
    """(hidden[rows] @ weight[cols].T + bias[cols]) * inv_t as a [BLOCK_N, BLOCK_V] fp32 tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    for k0 in range(0, H, BLOCK_H):
        kh = k0 + offs_h
        kmask = kh < H
        h = tl.load(h_ptr + rows[:, None] * stride_hn + kh[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
        # weight tile loaded transposed, [BLOCK_H, BLOCK_V], so tl.dot needs no tl.trans
        w = tl.load(w_ptr + cols[None, :] * stride_wv + kh[:, None], mask=col_mask[None, :] & kmask[:, None], other=0.0)
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc * inv_t


@triton.autotune(configs=_FWD_CONFIGS, key=["H", "V", "HAS_BIAS", "WANT_ENTROPY"])
@triton.jit
def _logprob_fwd_kernel(
    h_ptr, w_ptr, b_ptr,  # hidden (N, H), weight (V, H), bias (V,) or a dummy
    tgt_ptr,  # (N,) int64 target index within this weight, -1 = not here / ignored
    stats_ptr,  # (S, 4, N) fp32 out: per split (max, sum-exp, entropy term, target logit)
    N, V, H,
    stride_hn, stride_wv,
    inv_t,  # 1 / temperature
    HAS_BIAS: tl.constexpr, WANT_ENTROPY: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_s = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    num_splits = tl.num_programs(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)

    # This split's vocab tiles; the split count is fixed by the launcher, the tile size by the
    # config, so the share is computed here. Trailing splits may be empty (stats stay neutral).
    num_tiles = tl.cdiv(V, BLOCK_V)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m = tl.full((BLOCK_N,), _SENTINEL, dtype=tl.float32)  # running max
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m)
    a = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m) * (z - m)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)  # target logit (0 if not in this split)
    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_wv, inv_t,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, INPUT_PRECISION)
        z = tl.where(col_mask[None, :], z, _SENTINEL)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        zs = z - m_new[:, None]
        p = tl.where(col_mask[None, :], tl.exp(zs), 0.0)
        if WANT_ENTROPY:
            # re-reference the running term to the new max: e^(z-m)(z-m) -> e^(z-m')(z-m')
            a = alpha * (a + s * (m - m_new)) + tl.sum(p * zs, axis=1)
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new

    base = stats_ptr + pid_s * 4 * N + rows
    tl.store(base, m, mask=row_mask)
    tl.store(base + N, s, mask=row_mask)
    tl.store(base + 2 * N, a, mask=row_mask)
    tl.store(base + 3 * N, zt, mask=row_mask)


@triton.autotune(configs=_BWD_CONFIGS, key=["H", "V", "HAS_BIAS", "HAS_ENT"])
@triton.jit
def _logprob_bwd_kernel(
    h_ptr, w_ptr, b_ptr,  # hidden rows of this chunk (Nc, H), weight (V, H), bias (V,) or a dummy
    tgt_ptr,  # (Nc,) int64 target index within this weight, -1 = not here / ignored
    m_ptr, logs_ptr,  # (Nc,) fp32: global max M and log S of the scaled logits (lse = M + log S)
    g_ptr,  # (Nc,) fp32 upstream grad of logp, already zero on ignored rows
    ge_ptr, ent_ptr,  # (Nc,) fp32 upstream grad of the entropy and the entropy H (HAS_ENT), or dummies
    dz_ptr,  # (Nc, V) out, input dtype: d(logp . g + H . ge) / d(raw logits)
    N, V, H,
    stride_hn, stride_wv, stride_dzn,
    inv_t,
    HAS_BIAS: tl.constexpr, HAS_ENT: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,  # row blocks per swizzle group
):
    # Walk vocab tiles within groups of GROUP_N row blocks: a wave of programs touches GROUP_N
    # hidden blocks and ~P / GROUP_N weight tiles, both L2-resident.
    pid = tl.program_id(0).to(tl.int64)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_N * tl.cdiv(V, BLOCK_V)
    first_n = (pid // per_group) * GROUP_N
    group_n = tl.minimum(blocks_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_n
    pid_v = (pid % per_group) // group_n
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_mask = rows < N
    col_mask = cols < V
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_wv, inv_t,
                     HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, INPUT_PRECISION)
    m = tl.load(m_ptr + rows, mask=row_mask, other=0.0)
    log_s = tl.load(logs_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    logp = (z - m[:, None]) - log_s[:, None]  # z - M is exact near the max; see logprob.py
    p = tl.exp(logp)  # masked lanes: logp ~ -1e30, finite, p = 0
    onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    # chain rule through z = raw * inv_t: d/d(raw) = inv_t * g * (onehot - p)
    dz = (onehot - p) * (g * inv_t)[:, None]
    if HAS_ENT:  # dH/dz_j = -p_j (log p_j + H)
        ge = tl.load(ge_ptr + rows, mask=row_mask, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        dz -= p * (logp + ent[:, None]) * (ge * inv_t)[:, None]
    tl.store(dz_ptr + rows[:, None] * stride_dzn + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_FP32, INPUT_PRECISION) for operands of this dtype."""
    if _interpreting():
        return True, "ieee"
    if dtype == torch.float32:
        # fp32 operands follow torch's TF32 switch for matmuls (off by default), so fp32 results
        # match torch's own fp32 GEMMs
        return True, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return False, "tf32"  # bf16 / fp16 go straight to the tensor cores; the flag concerns fp32 only


def _num_splits(n: int, v: int, device: torch.device) -> int:
    """Vocab splits S for the forward grid: ~sqrt(SMs) for L2 reuse, more if rows alone cannot fill the GPU."""
    if _interpreting() or device.type != "cuda":
        return min(2, triton.cdiv(v, 64))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(round(sms**0.5), triton.cdiv(2 * sms, triton.cdiv(n, 128)))
    # at most one split per 256 vocab entries (the largest BLOCK_V), so splits are rarely empty
    return max(1, min(want, triton.cdiv(v, 256)))


def fwd_stats(hidden, weight, bias, tgt, inv_t: float, want_entropy: bool) -> torch.Tensor:
    """Partial statistics (S, 4, N) fp32 of the scaled logits, one slice per vocab split.

    hidden: (N, H), weight: (V, H), bias: (V,) or None, one dtype, unit stride along H; tgt: (N,) int64.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    splits = _num_splits(n, v, hidden.device)
    stats = torch.empty(splits, 4, n, dtype=torch.float32, device=hidden.device)
    dot_fp32, precision = _dot_flags(hidden.dtype)
    grid = lambda meta: (splits, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    with _on(hidden.device):
        _logprob_fwd_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, tgt, stats,
            n, v, h, hidden.stride(0), weight.stride(0), inv_t,
            HAS_BIAS=bias is not None, WANT_ENTROPY=want_entropy, DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        )
    return stats


def bwd_dlogits(hidden, weight, bias, tgt, m, log_s, g, inv_t: float, out: torch.Tensor,
                ge: torch.Tensor | None = None, ent: torch.Tensor | None = None) -> torch.Tensor:
    """Write d(sum g * logp + ge * entropy)/d(raw logits) for a row chunk into out (Nc, V), input dtype.

    hidden: (Nc, H) rows of the chunk; tgt, m, log_s, g: (Nc,); m, log_s, g fp32; ge, ent: (Nc,) fp32
    (the entropy's upstream grad and value), or None when the entropy is outside the loss. Returns out.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    dot_fp32, precision = _dot_flags(hidden.dtype)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),)  # noqa: E731
    with _on(hidden.device):
        _logprob_bwd_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, tgt, m, log_s, g,
            g if ge is None else ge, g if ent is None else ent, out,
            n, v, h, hidden.stride(0), weight.stride(0), out.stride(0), inv_t,
            HAS_BIAS=bias is not None, HAS_ENT=ge is not None, DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
            GROUP_N=8,
        )
    return out
