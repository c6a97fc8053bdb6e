"""Causal attention for the three forward modes, with the optional backends detected once.

    PaddedAttention   (B, T) batches, optional key-padding mask         -> SDPA
    VarlenAttention   a packed token stream split by cu_seqlens          -> flash-attn | xformers | flex | native
                                                                           (C, CPU fp32) | sdpa
    CachedAttention   new tokens appended to a slab KV cache, per slot   -> C kernel (CPU, fp32) | batched
                                                                           one-token matmuls (CPU) | SDPA

Each is a small callable `ctx(layer_idx, q, k, v) -> out` built once per forward by the model, so a
decoder layer never needs to know which mode it runs in. q: (..., num_heads, head_dim),
k / v: (..., num_kv_heads, head_dim); GQA maps query head i to kv head i // (num_heads // num_kv_heads),
the Llama / Qwen convention.

Backends: flash-attn and xformers are import-guarded (they cannot even be installed on CPU machines);
FlexAttention and SDPA ship with torch; native is the C kernel of sailor_engine.kernels.cpu_flash
(CPU, fp32, compiled at first use). `backend_status()` reports what is usable and why not;
`resolve_backend()` turns "auto" into the best available one for a device and dtype. A forced backend
that is unavailable is an error, never a silent substitute.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sailor_engine.kernels import cpu_attention, cpu_flash
from sailor_engine.kernels.decode_attention import decode_attention, default_splits
from sailor_engine.model.kv_cache import KVCache, _aligned

try:  # flash-attn 2.x varlen kernel (CUDA only)
    from flash_attn import flash_attn_varlen_func as _flash_varlen

    _FLASH_ERR = None
except (ImportError, NotImplementedError, OSError) as e:  # OSError: a wheel built for another CUDA/torch
    _flash_varlen, _FLASH_ERR = None, f"{type(e).__name__}: {e}"

try:  # xformers memory-efficient attention with a block-diagonal causal bias (CUDA only)
    from xformers.ops import fmha as _xfmha

    _XF_ERR = None
except (ImportError, NotImplementedError, OSError) as e:
    _xfmha, _XF_ERR = None, f"{type(e).__name__}: {e}"

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    _FLEX_ERR = None
except ImportError as e:  # pragma: no cover - torch >= 2.5 always has it
    create_block_mask = flex_attention = None
    _FLEX_ERR = f"{type(e).__name__}: {e}"

BACKENDS = ("flash_attn", "xformers", "flex", "native", "sdpa")
HAS_FLASH_ATTN = _flash_varlen is not None
HAS_XFORMERS = _xfmha is not None
HAS_FLEX = flex_attention is not None


def backend_status() -> dict[str, str]:
    """Each varlen backend -> "available" or "unavailable: <reason>" (for `sailor-engine info`)."""
    cuda = torch.cuda.is_available()
    status = {}
    for name, err in (("flash_attn", _FLASH_ERR), ("xformers", _XF_ERR)):
        if err is not None:
            status[name] = f"unavailable: {err}"
        elif not cuda:
            status[name] = "unavailable: needs CUDA"
        else:
            status[name] = "available"
    status["flex"] = "available" if HAS_FLEX else f"unavailable: {_FLEX_ERR}"
    status["native"] = "available (CPU, float32)" if cpu_flash.available() else cpu_flash.status()
    status["sdpa"] = "available"
    return status


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, *, head_dim: int | None = None,
                    group: int = 1) -> str:
    """Turn "auto" into a concrete backend for (device, dtype) and the heads' shape (head_dim, query
    heads per kv head); validate a forced one.

    auto on CUDA: flash-attn (fp16/bf16 only) > xformers > flex > sdpa. auto on CPU: native (the C
    kernel, fp32, when it builds and takes the shape), else sdpa; never flex, which without
    torch.compile materialises the whole (N, N) score matrix of the pack.
    """
    if requested not in ("auto",) + BACKENDS:
        raise ValueError(f"model.attn_backend must be one of auto, {', '.join(BACKENDS)}; got {requested!r}")
    cuda = device.type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        if cuda and HAS_FLASH_ATTN and half:
            return "flash_attn"
        if cuda and HAS_XFORMERS:
            return "xformers"
        if cuda and HAS_FLEX:
            return "flex"
        if not cuda and _native_reason(device, dtype, head_dim, group) is None:
            return "native"
        return "sdpa"
    reason = None
    if requested == "flash_attn" and (not HAS_FLASH_ATTN or not cuda or not half):
        reason = _FLASH_ERR or ("needs CUDA" if not cuda else f"needs fp16/bf16, got {dtype}")
    elif requested == "xformers" and (not HAS_XFORMERS or not cuda):
        reason = _XF_ERR or "needs CUDA"
    elif requested == "flex" and not HAS_FLEX:
        reason = _FLEX_ERR
    elif requested == "native":
        reason = _native_reason(device, dtype, head_dim, group)
    if reason:
        raise RuntimeError(f"attention backend {requested!r} was forced but is unavailable: {reason}")
    return requested


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype attention computes in: the autocast dtype under autocast on that device (fp32
    master weights, bf16 compute picks flash-attn on CUDA), else `dtype` (the activations')."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


def model_backend(cfg, device: torch.device, dtype: torch.dtype) -> str:
    """resolve_backend for a ModelConfig: its attn_backend and its heads' shape."""
    return resolve_backend(cfg.attn_backend, device, dtype, head_dim=cfg.dim_per_head,
                           group=cfg.num_heads // cfg.num_kv_heads)


def _native_reason(device: torch.device, dtype: torch.dtype, head_dim: int | None, group: int) -> str | None:
    """Why the native backend cannot run here, or None."""
    if device.type != "cpu":
        return f"needs the CPU, got {device.type}"
    if dtype != torch.float32:
        return f"needs float32, got {dtype}"
    if head_dim is None or not cpu_flash.supports(head_dim, group):
        return (f"takes head_dim a multiple of 16 in [16, 256] and at most 16 query heads per kv head, "
                f"got head_dim {head_dim}, {group} per kv head")
    return None if cpu_flash.available() else cpu_flash.status()


def _sdpa(q: Tensor, k: Tensor, v: Tensor, **kw) -> Tensor:
    """SDPA on (B, heads, T, d) tensors with GQA by head grouping."""
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kw)


class PaddedAttention:
    """Causal attention over a (B, T) batch; key_padding_mask (B, T), True = real token.

    Rows of left padding see no key at all; they attend to themselves instead of producing NaN
    (their outputs are padding and must be ignored by the caller).
    """

    def __init__(self, key_padding_mask: Tensor | None = None):
        self.mask = None
        if key_padding_mask is not None:
            m = key_padding_mask.bool()
            T = m.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=m.device).tril()
            mask = causal[None] & m[:, None, :]  # (B, Tq, Tk)
            mask |= torch.eye(T, dtype=torch.bool, device=m.device)[None]
            self.mask = mask[:, None]  # (B, 1, Tq, Tk)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, heads, T, d)
        if self.mask is None:
            out = _sdpa(q, k, v, is_causal=True)
        else:
            out = _sdpa(q, k, v, attn_mask=self.mask)
        return out.transpose(1, 2)


class VarlenAttention:
    """Causal attention confined to each sequence of a packed stream.

    cu_seqlens: (S + 1,) int cumulative lengths, cu_seqlens[0] = 0, cu_seqlens[-1] = N.
    """

    def __init__(self, cu_seqlens: Tensor, backend: str, max_seqlen: int | None = None):
        self.cu = cu_seqlens
        self.backend = backend
        self.lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        self.max_seqlen = max(self.lens, default=0) if max_seqlen is None else max_seqlen
        self._impl: Callable[[Tensor, Tensor, Tensor], Tensor] = getattr(self, f"_{backend}")
        self._block_mask = None  # FlexAttention's mask is the same for every layer: build it once

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self._impl(q, k, v)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        outs = []
        for qs, ks, vs in zip(q.split(self.lens), k.split(self.lens), v.split(self.lens)):
            o = _sdpa(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None], is_causal=True)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs) if outs else q.new_empty(q.shape)

    def _native(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return cpu_flash.flash_varlen(q, k, v, self.cu)

    def _flex(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        N = q.shape[0]
        if self._block_mask is None:
            doc = torch.repeat_interleave(
                torch.arange(len(self.lens), device=q.device), torch.tensor(self.lens, device=q.device), output_size=N
            )

            def document_causal(b, h, qi, ki):
                return (doc[qi] == doc[ki]) & (qi >= ki)

            self._block_mask = create_block_mask(document_causal, None, None, N, N, device=q.device)
        out = _flex_fn(q.device)(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            block_mask=self._block_mask, enable_gqa=q.shape[1] != k.shape[1],
        )
        return out[0].transpose(0, 1)

    def _flash_attn(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = _one_dtype(q, k, v)
        cu = self.cu.to(torch.int32)
        return _flash_varlen(q, k, v, cu, cu, self.max_seqlen, self.max_seqlen, causal=True)

    def _xformers(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = _one_dtype(q, k, v)
        group = q.shape[1] // k.shape[1]
        if group > 1:  # the block-diagonal bias path wants equal head counts
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        bias = _xfmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(self.lens)
        return _xfmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]


def _one_dtype(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """flash-attn and xformers take q, k, v of one dtype, which they do not cast themselves. Under
    autocast RoPE's fp32 tables promote q and k to fp32 while v comes out of its projection in the
    autocast dtype: cast all three to the autocast dtype (what SDPA does internally)."""
    dev = q.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else v.dtype
    return q.to(dt), k.to(dt), v.to(dt)


def _flex_fn(device: torch.device):
    """FlexAttention is fused only when compiled; eager (the CPU path) materialises the scores and
    has no backward on CPU (torch raises NotImplementedError, which we let through)."""
    return _compiled_flex() if device.type == "cuda" else flex_attention


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=True)


NATIVE_CPU_ATTENTION = True
"""Use the C kernel (sailor_engine.kernels.cpu_attention) for fp32 CPU caches when it builds; False
forces the torch path (tests run both). The two paths agree to rounding, and each is invariant to
batching and chunking on its own; a Generator's run uses one of them throughout."""


def native_cpu_attention(cache: KVCache) -> bool:
    """Whether CachedAttention over `cache` runs the C kernel."""
    k = cache.k
    return (NATIVE_CPU_ATTENTION and k.device.type == "cpu" and k.dtype == torch.float32
            and cpu_attention.supports(k.shape[3], k.shape[4]) and cpu_attention.available())


class CachedAttention:
    """Append packed new tokens to their cache slots and attend over each slot's whole prefix.

    Serves prefill, chunked prefill after a tool response, and one-token decode in one call.
    new tokens: N packed, cu_seqlens (S + 1,); slots: (S,) cache rows, distinct. Token j of sequence i
    goes to position lengths[slots[i]] + j. `positions` (N,) is what RoPE must use.

    Ways to attend, all reading the cache rows in place:
    - CPU, fp32 cache, the C kernel built (native_cpu_attention; sailor_engine.kernels.cpu_attention):
      every token, prefill or decode, is one query row over its row's prefix, each sum in a fixed order,
      so batch and chunking invariance hold by construction; it also writes K and V (README:
      benchmarks, for what it gains over the torch path below);
    - otherwise, every chunk one token (a decode step): OneTokenAttention over all rows, batched;
    - CPU, some chunk longer: per longer chunk, its queries as rows of their own over that row's keys,
      with OneTokenAttention's arithmetic (_attend_rows), in blocks of queries; the one-token
      rows still go through OneTokenAttention. So a token's K, V and output do not depend on how its
      sequence was chunked (prompt, tool response, decode, or a whole history re-prefilled after an
      eviction); SDPA's flash kernel rounded unlike the decode. No padding of short chunks to the
      longest: a 100-token tool response next to 63 decodes costs 100 queries, not 64 x 100;
    - CUDA, some chunk longer: one padded SDPA over the span of cache rows [lo, hi) (a kernel launch per
      sequence would cost more there). Rows of the span not in this call get one dummy query that sees
      one key; their outputs are dropped.
    """

    def __init__(self, cache: KVCache, cu_seqlens: Tensor, slots: Tensor):
        dev = cache.lengths.device
        slots = slots.to(dev, torch.int64)
        n = (cu_seqlens[1:] - cu_seqlens[:-1]).to(dev, torch.int64)  # (S,)
        if len(slots) == 0 or len(slots) != len(n):
            raise ValueError(f"CachedAttention: need one slot per sequence, got {len(slots)} slots for {len(n)} sequences")
        S = len(slots)
        lo, hi = int(slots.min()), int(slots.max()) + 1
        contiguous = hi - lo == S and bool((slots == torch.arange(lo, hi, device=dev)).all())
        if not contiguous and len(torch.unique(slots)) != S:
            raise ValueError("CachedAttention: slots must be distinct within one call")
        start = cache.lengths[slots]
        end = start + n
        k_max = int(end.max())
        if k_max > cache.max_seq_len:
            raise ValueError(f"KV cache overflow: a sequence needs {k_max} positions, "
                             f"the cache holds {cache.max_seq_len}")
        self.cache, self.slots, self.end, self.lo, self.hi = cache, slots, end, lo, hi
        self.decode = bool((n == 1).all())
        self.native = native_cpu_attention(cache)
        if self.decode:
            self.tok_slot, self.positions = slots, start
        else:
            N = int(n.sum())
            seq_of_tok = torch.repeat_interleave(torch.arange(S, device=dev), n, output_size=N)
            offset = torch.arange(N, device=dev) - cu_seqlens[:-1].to(dev, torch.int64)[seq_of_tok]
            self.tok_slot = slots[seq_of_tok]  # (N,)
            self.positions = start[seq_of_tok] + offset  # (N,)
        if self.native:
            self.nvis = self.positions + 1
            return
        if self.decode:
            self.one = OneTokenAttention(cache, slots, start, lo=lo, hi=hi, contiguous=contiguous)
            return
        q_max, k_max = max(int(n.max()), 1), max(k_max, 1)  # >= 1: empty chunks are legal
        self.q_max, self.k_max = q_max, k_max
        self.per_seq = dev.type == "cpu"
        if self.per_seq:
            self._init_per_sequence(cu_seqlens, n, start)
            return
        self.row_of_tok, self.offset = self.tok_slot - lo, offset  # row within the span
        self.direct = q_max == 1 and contiguous
        # causal mask over the span: a row's query j sits at position start + j
        span_start = torch.zeros(hi - lo, dtype=torch.int64, device=dev)
        span_start[slots - lo] = start
        q_pos = span_start[:, None] + torch.arange(q_max, device=dev)[None]  # (R, q_max)
        mask = torch.arange(k_max, device=dev)[None, None, :] <= q_pos[:, :, None]  # (R, q_max, k_max)
        mask[:, :, 0] = True  # padding queries (dummy rows, short chunks) see one key: no NaN; dropped
        self.mask = mask[:, None]  # (R, 1, q_max, k_max)

    def _init_per_sequence(self, cu_seqlens: Tensor, n: Tensor, start: Tensor) -> None:
        dev = n.device
        single = n == 1
        self.one = None
        if int(single.sum()) >= 1:  # one-token rows (decodes) always take the batched path, even alone
            self.one_tok = cu_seqlens[:-1].to(dev, torch.int64)[single]  # their tokens in the packed order
            self.one = OneTokenAttention(self.cache, self.slots[single], start[single])
        # (first token, chunk length, start position, slot) of every row attended on its own
        rows = zip(cu_seqlens[:-1].tolist(), n.tolist(), start.tolist(), self.slots.tolist())
        rows = [r for r in rows if r[1] > 1 or (r[1] == 1 and self.one is None)]
        # (first token, start position, slot, first query, queries, keys) of every block of queries
        cap = self.cache.k.shape[-1]
        # queries per block: up to _Q_BLOCK, fewer on long rows, so that queries x kv heads x keys stays
        # within _SCORES_PER_BLOCK (the scores are g times that); any split gives each row the same result
        kvh, self.blocks = self.cache.k.shape[2], []
        for t0, n, st, slot in rows:
            q_block = max(1, min(_Q_BLOCK, _SCORES_PER_BLOCK // (kvh * _aligned(st + n))))
            for j0 in range(0, n, q_block):
                m = min(q_block, n - j0)
                self.blocks.append((t0, st, slot, j0, m, min(_aligned(st + j0 + m), cap)))
        self._bias: list[Tensor] = []  # per block, built at the first layer
        self._bias_dtype: torch.dtype | None = None

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        c = self.cache
        if self.native:  # fp32 cache; activations of another dtype (CPU autocast) are attended in fp32
            cpu_attention.append_kv(c.k[layer], c.v[layer], k.float(), v.float(), self.tok_slot, self.positions)
            return cpu_attention.cached_attention(q.float(), c.k[layer], c.v[layer], self.tok_slot, self.nvis).to(q.dtype)
        c.k[layer, self.tok_slot, :, :, self.positions] = k.to(c.k.dtype)
        c.v[layer, self.tok_slot, :, self.positions] = v.to(c.v.dtype)
        if self.decode:
            return self.one(layer, q)
        if self.per_seq:
            return self._per_sequence(layer, q)
        # (R, kv_heads, k_max, d): a copy, since SDPA on the transposed view is ~4x slower on CPU (and
        # CUDA's fused kernels need a unit-stride last dim)
        keys = c.k[layer, self.lo:self.hi, :, :, : self.k_max].transpose(-1, -2).to(q.dtype).contiguous()
        vals = c.v[layer, self.lo:self.hi, :, : self.k_max].to(q.dtype)
        if self.direct:
            qp = q[:, None]
        else:
            qp = q.new_zeros(self.hi - self.lo, self.q_max, *q.shape[1:])
            qp[self.row_of_tok, self.offset] = q
        out = _sdpa(qp.transpose(1, 2), keys, vals, attn_mask=self.mask)
        out = out.transpose(1, 2)  # (R, q_max, heads, d)
        return out[:, 0] if self.direct else out[self.row_of_tok, self.offset]

    def _per_sequence(self, layer: int, q: Tensor) -> Tensor:
        """CPU path of a call with chunks longer than one token (see the class docstring). Each query
        of a chunk is a row of its own, attended with OneTokenAttention's arithmetic (_attend_rows)
        over the keys up to its position, in blocks of queries (bounds the scores' memory): so a
        token's K, V and output are the same whether it came in a long chunk, a short one or a decode
        step, and a history re-prefilled after its cache row was taken equals the one decoded."""
        c = self.cache
        out = q.new_empty(q.shape)
        if self.one is not None:
            out[self.one_tok] = self.one(layer, q[self.one_tok])
        H, d = q.shape[1:]
        kvh = c.k.shape[2]
        g = H // kvh
        if self._bias_dtype != q.dtype:
            self._bias = [_block_bias(m, K - (st + j0 + 1), g, q.dtype, q.device) for _, st, _, j0, m, K in self.blocks]
            self._bias_dtype = q.dtype
        for (t0, st, slot, j0, m, K), bias in zip(self.blocks, self._bias):
            keys_t = c.k[layer, slot, :, :, :K].to(q.dtype)  # (kv_heads, d, K), a view
            vals = c.v[layer, slot, :, :K].to(q.dtype)  # (kv_heads, K, d)
            qg = q[t0 + j0 : t0 + j0 + m].view(m, kvh, g, d).transpose(0, 1).reshape(kvh, m * g, d)
            o = _attend_rows(qg, keys_t, vals, bias, st + j0 + 1)  # (kv_heads, m * g, d)
            out[t0 + j0 : t0 + j0 + m] = o.view(kvh, m, g, d).transpose(0, 1).reshape(m, H, d)
        return out

    def commit(self) -> None:
        """Advance the slots' lengths once every layer has written its keys and values."""
        self.cache.lengths[self.slots] = self.end


class StaticDecodeAttention:
    """One new token per cache row, with static shapes and no host synchronisation: the decode step
    a CUDA graph can capture (rollout/decode_graph.py), and its eager twin on any device.

    slots: (B,) int64 device tensor of cache rows. Positions are read from cache.lengths on the device,
    K and V are written there by index_put, attention is sailor_engine.kernels.decode_attention over the
    rows in place (Triton on CUDA; its PyTorch path on CPU unless `impl` says otherwise), and commit()
    advances the lengths on the device. Rows may repeat (padding rows share a scratch row: their writes
    race, and their outputs are to be dropped). The caller keeps every row's length + 1 within the
    cache: nothing here can check it without reading device memory.
    """

    def __init__(self, cache: KVCache, slots: Tensor, *, impl: str = "auto"):
        self.cache, self.slots, self.impl = cache, slots, impl
        self.positions = cache.lengths.index_select(0, slots)  # (B,) the new token's position
        self.nvis = self.positions + 1
        self.splits = default_splits(len(slots), cache.k.shape[2], cache.k.shape[-1], slots.device)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        c = self.cache
        c.k[layer, self.slots, :, :, self.positions] = k.to(c.k.dtype)  # (B, kv_heads, d)
        c.v[layer, self.slots, :, self.positions] = v.to(c.v.dtype)
        return decode_attention(q, c.k[layer], c.v[layer], self.slots, self.nvis, num_splits=self.splits, impl=self.impl)

    def commit(self) -> None:
        self.cache.lengths.index_put_((self.slots,), self.nvis)


ROW_ALIGN = 4
"""CPU GEMMs of the generator run on a row count rounded up to a multiple of this (transformer._rows_aligned)."""


def pad_rows(x: Tensor, dim: int = 0) -> Tensor:
    """x with copies of its first row along `dim` appended, up to a multiple of ROW_ALIGN rows."""
    pad = -x.shape[dim] % ROW_ALIGN
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.narrow(dim, 0, 1).expand(shape)], dim=dim)


_PV_CHUNK = 128  # keys per probs @ V product in OneTokenAttention (batch invariance, see _attend_rows)
_Q_BLOCK = 256  # queries per block in CachedAttention's CPU path for longer chunks, at most
_SCORES_PER_BLOCK = 1 << 22  # and queries x kv heads x keys at most this (16 MiB of fp32 scores per g)


def _block_bias(m: int, w: int, g: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(1, m * g, w) bias of a block of m consecutive queries (g rows each) over the w keys after the
    first query's own position (the keys up to it are visible to them all, see _attend_rows' col0):
    query r sees the first r of them, so -inf where key >= r."""
    bias = torch.full((m, w), -math.inf, dtype=dtype, device=device).triu_()
    return bias[:, None].expand(m, g, w).reshape(1, m * g, w)


def _attend_rows(qg: Tensor, keys_t: Tensor, vals: Tensor, bias: Tensor, col0: int = 0) -> Tensor:
    """The arithmetic of every CPU cached-attention row (OneTokenAttention, and CachedAttention's
    longer chunks): qg (B, M, d) query rows over keys_t (B, d, K), vals (B, K, d), with an additive
    bias broadcastable to (B, M, K - col0) on keys col0.. (0, or -inf for a hidden key; keys before
    col0 are visible to every row, and adding 0 to them would change nothing) -> (B, M, d).

    scores = (qg / sqrt(d)) K^T + bias, fp32 softmax, @ V. A row's result depends on its own query,
    keys and bias only: not on the other rows, M (padded to a multiple of 4 on CPU: MKL rounds a
    row by its GEMM's row count, see transformer._rows_aligned), B, or K (a multiple of _ALIGN). On
    CPU probs @ V runs in fixed chunks of the key axis, summed in order: one bmm over all K keys
    rounds by K (MKL changes its blocking past 128 keys on AMD Zen 4, past ~350 on Intel Xeon), and K
    is the batch's longest row. Chunks past a row's end add exact zeros, and a chunk's own length
    (<= _PV_CHUNK) does not move its rounding. Costs 12-20% of this product with 256-key chunks
    (K = 512..2048, 32 rows, one thread, Intel). (CUDA: one bmm; cuBLAS picks kernels by shape
    anyway, batch invariance there would take kernels of its own.)"""
    K, M = keys_t.shape[-1], qg.shape[1]
    if M % ROW_ALIGN and qg.device.type == "cpu":  # rows padded to a multiple of 4 (transformer._rows_aligned)
        if bias.shape[-2] == M and M > 1:  # a per-row bias is padded with its first row's
            bias = pad_rows(bias, dim=-2)
        return _attend_rows(pad_rows(qg, dim=1), keys_t, vals, bias, col0)[:, :M].contiguous()
    # not baddbmm(bias, ...): past some size it rounds differently (M = 512 vs 2 rows), bmm does not
    scores = torch.bmm(qg * (1 / math.sqrt(qg.shape[-1])), keys_t)
    scores[..., col0:].add_(bias)
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(vals.dtype)
    if qg.device.type != "cpu" or K <= _PV_CHUNK:
        return torch.bmm(probs, vals)
    out = torch.bmm(probs[..., :_PV_CHUNK], vals[:, :_PV_CHUNK])
    for c0 in range(_PV_CHUNK, K, _PV_CHUNK):
        out.baddbmm_(probs[..., c0:c0 + _PV_CHUNK], vals[:, c0:c0 + _PV_CHUNK])
    return out


class OneTokenAttention:
    """Attention of one new token per cache row (written already) over the row's prefix, batched.

    slots: (S,) distinct rows; start: (S,) the new token's position, so keys 0..start are visible.
    The keys are read as views of the cache rows [lo, hi) spanning the slots (rows of the span not in
    the call attend to key 0 only and are dropped), or copied out when the slots are sparse in it.
    The g = heads / kv_heads query heads sharing a kv head become g query *rows* of that kv head, so
    each cached key is read once, not once per query head, and the whole step is three batched ops
    over the (R * kv_heads) rows (_attend_rows): scores = (q / sqrt(d)) K^T + bias (0, or -inf past a
    row's length), fp32 softmax, @ V. On CPU this beats SDPA's flash kernel, whose per-block overhead
    dominates with g <= 8 queries; the sums agree to rounding.
    """

    def __init__(self, cache: KVCache, slots: Tensor, start: Tensor, *, lo: int | None = None,
                 hi: int | None = None, contiguous: bool | None = None):
        dev = start.device
        self.cache, self.slots = cache, slots
        self.lo = int(slots.min()) if lo is None else lo
        self.hi = int(slots.max()) + 1 if hi is None else hi
        if contiguous is None:
            contiguous = self.hi - self.lo == len(slots) and bool((slots == torch.arange(self.lo, self.hi, device=dev)).all())
        # Keys attended: up to the longest row, rounded up to a multiple of _ALIGN (the extra ones are
        # masked like any past a row's end), so that rows of the scores and probs start 64-byte aligned
        # whatever K is: MKL's bmm rounds unaligned rows differently (CPU), and a row's output must not
        # depend on its batch's longest row or on this call's path (views of the span or copies).
        self.direct = contiguous
        self.k_max = min(_aligned(int(start.max()) + 1), cache.k.shape[-1])
        # few rows scattered over a wide span (the tail of a rollout, sessions parked on tools): copying
        # the S rows out beats walking all R rows of the span once R > 3 S (CPU: even at R = 3 S,
        # 2.4x faster at R = 7 S)
        self.gather = not contiguous and self.hi - self.lo > 3 * len(slots)
        if contiguous or self.gather:
            self.row_of_tok = None
            q_pos = start
        else:
            self.row_of_tok = slots - self.lo
            q_pos = torch.zeros(self.hi - self.lo, dtype=torch.int64, device=dev)
            q_pos[self.row_of_tok] = start
        self.visible = torch.arange(self.k_max, device=dev)[None, :] <= q_pos[:, None]  # (R, k_max)
        self._bias: Tensor | None = None  # (R * kv_heads, 1, k_max) additive mask, built at the first layer

    def __call__(self, layer: int, q: Tensor) -> Tensor:
        """q: (S, heads, d) -> (S, heads, d)."""
        c, R, K = self.cache, self.hi - self.lo, self.k_max
        S, H, d = q.shape
        kvh = c.k.shape[2]
        g = H // kvh
        if self.gather:  # copies of the call's rows, in call order (index_select: ~25% faster than indexing)
            R = S
            keys_t = c.k[layer, :, :, :, :K].index_select(0, self.slots).to(q.dtype).reshape(R * kvh, d, K)
            vals = c.v[layer, :, :, :K].index_select(0, self.slots).to(q.dtype).reshape(R * kvh, K, d)
        else:  # views of the span's rows
            keys_t = c.k[layer, self.lo:self.hi, :, :, :K].to(q.dtype).reshape(R * kvh, d, K)
            vals = c.v[layer, self.lo:self.hi, :, :K].to(q.dtype).reshape(R * kvh, K, d)
        if self.direct or self.gather:
            qg = q.reshape(R * kvh, g, d)  # query heads i*g .. i*g+g-1 read kv head i
        else:
            qg = q.new_zeros(R, H, d)
            qg[self.row_of_tok] = q
            qg = qg.view(R * kvh, g, d)
        if self._bias is None or self._bias.dtype != q.dtype:
            bias = torch.zeros(self.visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~self.visible, -math.inf)
            self._bias = bias.repeat_interleave(kvh, dim=0)[:, None]  # (R * kv_heads, 1, K)
        out = _attend_rows(qg, keys_t, vals, self._bias)  # (R * kv_heads, g, d)
        out = out.view(R, H, d)
        return out if self.row_of_tok is None else out[self.row_of_tok]
