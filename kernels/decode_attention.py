"""One-token attention over a slab KV cache, read in place: the decode step's attention on CUDA.

    out = decode_attention(q, k_cache, v_cache, slots, nvis)     # (B, H, D), no host synchronisation

q: (B, H, D), one new token per row; k_cache: (S, KVH, D, CAP) one layer's keys, stored transposed
(the position axis has unit stride); v_cache: (S, KVH, CAP, D); slots: (B,) int64, the cache row
each query reads; nvis: (B,) int64, the keys it sees (positions 0 .. nvis - 1, its own included).
H = G * KVH: query heads h*G .. h*G + G - 1 share kv head h (grouped-query attention).

Why a kernel: a decode step's shapes change every step (which rows, how long each is), and the
batched torch path (model/attention.py, OneTokenAttention) reads them on the host to cut its views.
This kernel takes rows and lengths as device tensors, so a decode step has static shapes and never
synchronises: it can be captured in a CUDA graph (rollout/decode_graph.py). It reads each row's keys
once, only up to its own length, from the cache itself (no gather copy, no padding to the longest
row), and splits long rows over several programs (flash-decoding) when rows alone cannot fill the GPU.

Numerics: scores = (q . k) * scale in fp32, softmax with an online max (finite sentinel, not -inf,
for lanes past a row's end: -inf - -inf would be NaN), p @ V accumulated in fp32; splits are merged
exactly (each rescaled by exp(its max - the row's max)). bf16 / fp16 caches feed tl.dot directly
(fp32 accumulation); fp32 caches use IEEE fp32 dots (no TF32). Under TRITON_INTERPRET=1 (CPU tests)
every operand is upcast to fp32 first: the interpreter cannot do bf16 arithmetic.

impl="auto" runs the Triton kernels on CUDA and a plain PyTorch path on CPU (the whole row capacity
gathered and masked: O(B * CAP) memory, fine for tests and small caches); "triton" forces the kernels
(on CPU only under TRITON_INTERPRET=1); "torch" forces the PyTorch path. The float64 specification is
`reference.decode_attention_reference`.

Contract, not checked (checking would read device memory on the host): 1 <= nvis <= CAP and slots
in [0, S). nvis is clamped to CAP in the kernel, so a bad length never reads past a cache row.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import interpreting as _interpreting
from ._launch import on_device as _on

# Finite stand-in for -inf on keys past a row's end: exp(_SENTINEL - m) underflows to exactly 0 for
# any real max m, where -inf would give NaN on a split whose tiles are all masked.
_SENTINEL = tl.constexpr(-1e30)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _decode_attention_kernel(
    q_ptr,  # (B, H, D) queries
    k_ptr,  # (S, KVH, D, CAP) keys of one layer, position axis contiguous
    v_ptr,  # (S, KVH, CAP, D) values of one layer, head dim contiguous
    slot_ptr,  # (B,) int64 cache row of each query
    nvis_ptr,  # (B,) int64 keys visible to each query
    o_ptr,  # SPLITS == 1: (B, H, D) output; else (B, H, SPLITS, D) fp32 unnormalised partials
    ml_ptr,  # (2, B, H, SPLITS) fp32 partial max and sum-exp (unused when SPLITS == 1)
    B, H, CAP,
    stride_qb, stride_qh,  # q strides (D contiguous)
    stride_ks, stride_kh, stride_kd,  # k strides (CAP contiguous)
    stride_vs, stride_vh, stride_vn,  # v strides (D contiguous)
    stride_ob, stride_oh,  # output strides when SPLITS == 1 (D contiguous)
    scale,  # softmax scale, fp32
    G: tl.constexpr,  # query heads per kv head
    D: tl.constexpr,  # head dim
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,  # powers of two >= 16 covering G and D
    BLOCK_N: tl.constexpr,  # keys per tile
    SPLITS: tl.constexpr,  # programs per (row, kv head), each over a contiguous share of the keys
    DOT_FP32: tl.constexpr,  # upcast operands before tl.dot (mixed dtypes; the interpreter)
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands (no TF32)
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    slot = tl.load(slot_ptr + b)
    nvis = tl.minimum(tl.load(nvis_ptr + b), CAP)
    # this split's keys [lo, hi): whole tiles, so only the row's last tile is partial
    per_split = tl.cdiv(tl.cdiv(nvis, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, nvis)

    g = tl.arange(0, BLOCK_G)
    dd = tl.arange(0, BLOCK_D)
    heads = kvh * G + g
    gmask = g < G
    dmask = dd < D
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dd[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_row = k_ptr + slot * stride_ks + kvh * stride_kh
    v_row = v_ptr + slot * stride_vs + kvh * stride_vh

    m = tl.full((BLOCK_G,), _SENTINEL, dtype=tl.float32)  # running max of the scores
    l = tl.zeros((BLOCK_G,), dtype=tl.float32)  # sum exp(score - m)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)  # sum exp(score - m) * v
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < hi
        k = tl.load(k_row + dd[:, None] * stride_kd + n[None, :], mask=dmask[:, None] & nmask[None, :], other=0.0)
        v = tl.load(v_row + n[:, None] * stride_vn + dd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=INPUT_PRECISION) * scale  # (BLOCK_G, BLOCK_N) fp32
        s = tl.where(nmask[None, :], s, _SENTINEL)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.where(nmask[None, :], tl.exp(s - m_new[:, None]), 0.0)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m = m_new

    if SPLITS == 1:  # the whole row: normalise and write the output directly (nvis >= 1, so l > 0)
        out = acc / l[:, None]
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + dd[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=gmask[:, None] & dmask[None, :])
    else:  # an empty split (a short row) leaves m = sentinel, l = 0, acc = 0: weight 0 in the merge
        row = (b * H + heads) * SPLITS + split  # [BLOCK_G] index into (B, H, SPLITS)
        tl.store(o_ptr + row[:, None] * D + dd[None, :], acc, mask=gmask[:, None] & dmask[None, :])
        tl.store(ml_ptr + row, m, mask=gmask)
        tl.store(ml_ptr + B * H * SPLITS + row, l, mask=gmask)


@triton.jit
def _decode_merge_kernel(
    part_ptr,  # (B * H, SPLITS, D) fp32 unnormalised partials
    ml_ptr,  # (2, B * H, SPLITS) fp32 partial max and sum-exp
    o_ptr,  # (B, H, D) output
    BH, H,
    stride_ob, stride_oh,  # output strides (D contiguous)
    D: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,  # BLOCK_S: power of two >= SPLITS
):
    r = tl.program_id(0).to(tl.int64)  # one (row, head)
    s = tl.arange(0, BLOCK_S)
    dd = tl.arange(0, BLOCK_D)
    smask = s < SPLITS
    m = tl.load(ml_ptr + r * SPLITS + s, mask=smask, other=_SENTINEL)
    l = tl.load(ml_ptr + BH * SPLITS + r * SPLITS + s, mask=smask, other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))  # (BLOCK_S,): 0 for empty splits and padding lanes
    part = tl.load(part_ptr + (r * SPLITS + s)[:, None] * D + dd[None, :], mask=smask[:, None] & (dd < D)[None, :],
                   other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    b, h = r // H, r % H
    tl.store(o_ptr + b * stride_ob + h * stride_oh + dd, out.to(o_ptr.dtype.element_ty), mask=dd < D)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     nvis: torch.Tensor, *, scale: float | None = None, num_splits: int | None = None,
                     impl: str = "auto") -> torch.Tensor:
    """softmax(q . K[:nvis] * scale) @ V[:nvis] for every row and head, over its cache row in place.

    q: (B, H, D); k_cache: (S, KVH, D, CAP); v_cache: (S, KVH, CAP, D); slots, nvis: (B,) integer.
    Returns (B, H, D) in q's dtype. scale defaults to 1 / sqrt(D). num_splits: programs per (row, kv
    head) along the keys (Triton path; default: enough to fill the GPU, from shapes alone, so a CUDA
    graph captures one value). Shapes and dtypes are checked; values are not (see the module docstring).
    """
    B, H, D = _check(q, k_cache, v_cache, slots, nvis)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not _use_triton(impl, q):
        return _torch_decode_attention(q, k_cache, v_cache, slots, nvis, scale)
    kvh, cap = k_cache.shape[1], k_cache.shape[3]
    G = H // kvh
    splits = num_splits or default_splits(B, kvh, cap, q.device)
    block_n = 16 if _interpreting() else 64
    dot_fp32 = _interpreting() or q.dtype == torch.float32 or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype
    out = torch.empty_like(q)
    if splits == 1:
        part, ml = out, out  # the kernel writes the output itself; ml unused
    else:
        part = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
        ml = torch.empty(2, B, H, splits, dtype=torch.float32, device=q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_d = max(16, triton.next_power_of_2(D))
    with _on(q.device):
        _decode_attention_kernel[(B, kvh, splits)](
            q, k_cache, v_cache, slots, nvis, part, ml, B, H, cap,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), scale,
            G=G, D=D, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_D=block_d, BLOCK_N=block_n,
            # IEEE fp32 dots (no TF32) where operands are fp32; the flag concerns fp32 operands only
            SPLITS=splits, DOT_FP32=dot_fp32, INPUT_PRECISION="ieee" if dot_fp32 else "tf32",
            num_warps=4,
        )
        if splits > 1:
            _decode_merge_kernel[(B * H,)](
                part, ml, out, B * H, H, out.stride(0), out.stride(1),
                D=D, BLOCK_D=block_d, SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits),
            )
    return out


def default_splits(batch: int, kv_heads: int, capacity: int, device: torch.device) -> int:
    """Key splits per (row, kv head): about two programs per SM in all, each over >= 256 keys of
    capacity. A function of shapes only (a CUDA graph replays the launch it captured). On CPU
    (interpreter) 2 whenever the capacity allows, so the tests run the merge."""
    if device.type != "cuda":
        return 2 if capacity >= 32 else 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, batch * kv_heads), capacity // 256, 64))


def _torch_decode_attention(q, k_cache, v_cache, slots, nvis, scale: float) -> torch.Tensor:
    """The same in PyTorch, fp32 (fp64 for fp64 input): every row's whole capacity gathered and masked."""
    B, H, D = q.shape
    kvh, cap = k_cache.shape[1], k_cache.shape[3]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys = k_cache.index_select(0, slots).to(ct)  # (B, KVH, D, CAP)
    vals = v_cache.index_select(0, slots).to(ct)  # (B, KVH, CAP, D)
    scores = (q.to(ct).view(B, kvh, H // kvh, D) @ keys) * scale  # (B, KVH, G, CAP)
    hidden = torch.arange(cap, device=q.device)[None, :] >= nvis.clamp(max=cap)[:, None]  # (B, CAP)
    scores = scores.masked_fill(hidden[:, None, None, :], -math.inf)
    vals = vals.masked_fill(hidden[:, None, :, None], 0.0)  # 0 * garbage (inf, NaN) past a row's end is not 0
    out = torch.softmax(scores, dim=-1) @ vals  # (B, KVH, G, D)
    return out.reshape(B, H, D).to(q.dtype)


def _use_triton(impl: str, q: torch.Tensor) -> bool:
    if impl == "torch":
        return False
    if impl == "auto":
        return q.is_cuda and q.dtype in _DTYPES
    if impl != "triton":
        raise ValueError(f"decode_attention: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"decode_attention: impl='triton' supports float16/bfloat16/float32, got {q.dtype}")
    if not q.is_cuda and not _interpreting():
        raise RuntimeError("decode_attention: impl='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return True


def _check(q, k_cache, v_cache, slots, nvis) -> tuple[int, int, int]:
    if q.ndim != 3:
        raise ValueError(f"decode_attention: q must be (B, H, D), got shape {tuple(q.shape)}")
    B, H, D = q.shape
    if k_cache.ndim != 4 or v_cache.ndim != 4:
        raise ValueError(f"decode_attention: k_cache (S, KVH, D, CAP) and v_cache (S, KVH, CAP, D) must be 4-D, "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    S, kvh, dk, cap = k_cache.shape
    if dk != D or tuple(v_cache.shape) != (S, kvh, cap, D):
        raise ValueError(f"decode_attention: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} do not "
                         f"match q's head dim {D} as (S, KVH, D, CAP) and (S, KVH, CAP, D)")
    if kvh < 1 or H % kvh:
        raise ValueError(f"decode_attention: q's {H} heads are not a multiple of the cache's {kvh} kv heads")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention: k_cache needs a unit-stride position axis and v_cache a unit-stride head dim")
    for name, t in (("slots", slots), ("nvis", nvis)):
        if t.shape != (B,) or t.dtype != torch.int64:
            raise ValueError(f"decode_attention: {name} must be int64 of shape ({B},), got {t.dtype} {tuple(t.shape)}")
    devices = {t.device for t in (q, k_cache, v_cache, slots, nvis)}
    if len(devices) > 1:
        raise ValueError(f"decode_attention: all tensors must be on one device, got {sorted(map(str, devices))}")
    return B, H, D
