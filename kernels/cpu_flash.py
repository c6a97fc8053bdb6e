"""Causal varlen attention for training on the CPU in C (csrc/cpu_flash.c): forward and backward.

    from sailor_engine.kernels import cpu_flash
    if cpu_flash.available() and cpu_flash.supports(head_dim, num_heads // num_kv_heads):
        out = cpu_flash.flash_varlen(q, k, v, cu_seqlens)     # differentiable in q, k and v

q (N, H, d), k and v (N, kv_heads, d): a packed stream of sequences, sequence s the tokens
[cu_seqlens[s], cu_seqlens[s+1]); each token attends to its own sequence's tokens up to itself
(softmax(q k^T / sqrt(d)) v, query head j on kv head j // (H // kv_heads)). float32 on the CPU.

Why: torch's CPU flash kernel reaches about a third of the machine's fp32 peak at head_dim 32 (the
demo model's), where the softmax weighs as much as the products. This one tiles like
FlashAttention-2 (the forward saves each row's log-sum-exp, the backward recomputes probabilities
block by block) with register-tiled products on blocks that stay in cache: 0.20 s against SDPA's
0.37 s for an RFT step's 16 sequences x 4 layers, forward and backward, on 2 EPYC cores
(benchmarks/bench_train_attention.py; SDPA is still faster on one long sequence, README).

Deterministic: each (sequence, kv head) is one job whose sums run in a fixed order, so results do
not depend on the thread count or on the other sequences of the pack; a sequence too long for one
thread's share is cut into chunk jobs that compute the same bits (`flash_varlen`'s split). The
numerics differ from SDPA's in the last bits (another summation order), as any two attention
kernels do: it is a backend (model.attn_backend = native), tested against
kernels.reference.varlen_attention_reference in float64.

Built with the other C kernels by native.py: no compiler, or SAILOR_ENGINE_NATIVE=0, and
`available()` is False and `status()` says why.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native


def available() -> bool:
    """Whether the C kernels are built and loaded (builds them on the first call)."""
    return native.load() is not None


def status() -> str:
    return "available (csrc/cpu_flash.c)" if available() else f"unavailable: {native.error()}"


def supports(head_dim: int, group: int) -> bool:
    """Whether the kernel takes this head_dim and number of query heads per kv head."""
    return head_dim % 16 == 0 and 16 <= head_dim <= 256 and 1 <= group <= 16


def _fail(fn: str, rc: int, q: Tensor, k: Tensor) -> None:
    if rc == -1:
        raise MemoryError(f"cpu_flash.{fn}: out of memory for scratch")
    if rc == -2:
        raise ValueError(f"cpu_flash.{fn}: unsupported shape q {tuple(q.shape)}, k {tuple(k.shape)} (need head_dim "
                         f"a multiple of 16 up to 256 and heads a multiple of kv_heads, at most 16 per kv head)")
    if rc == -3:
        raise ValueError(f"cpu_flash.{fn}: cu_seqlens must rise from 0 to the {q.shape[0]} tokens")
    if rc:
        raise RuntimeError(f"cpu_flash.{fn}: error {rc}")


def _lib():
    lib = native.load()
    if lib is None:
        raise RuntimeError(f"cpu_flash: {native.error()}")
    return lib


def _checked(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 3:
            raise ValueError(f"cpu_flash: {name} must be a 3-d float32 CPU tensor (tokens, heads, head_dim), got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    N, H, d = q.shape
    if k.shape[0] != N or k.shape[2] != d or v.shape != k.shape or H % k.shape[1]:
        raise ValueError(f"cpu_flash: q (N, H, d), k and v (N, kv_heads, d) with H a multiple of kv_heads; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not supports(d, H // k.shape[1]):
        _fail("flash_varlen", -2, q, k)
    cu = cu_seqlens.to(device="cpu", dtype=torch.int64).contiguous()
    if cu.dim() != 1 or cu.numel() < 1:
        _fail("flash_varlen", -3, q, k)
    return q.contiguous(), k.contiguous(), v.contiguous(), cu


class _FlashVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cu: Tensor, split: int) -> Tensor:
        N, H, d = q.shape
        o, lse = torch.empty_like(q), torch.empty(N, H)
        rc = _lib().se_flash_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), cu.data_ptr(), cu.numel() - 1, N, H,
                                 k.shape[1], d, o.data_ptr(), lse.data_ptr(), split, torch.get_num_threads())
        _fail("forward", rc, q, k)
        ctx.save_for_backward(q, k, v, cu, o, lse)
        ctx.split = split
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, cu, o, lse = ctx.saved_tensors
        do = do.to(torch.float32).contiguous()
        N, H, d = q.shape
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        rc = _lib().se_flash_bwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), do.data_ptr(),
                                 cu.data_ptr(), cu.numel() - 1, N, H, k.shape[1], d, dq.data_ptr(), dk.data_ptr(),
                                 dv.data_ptr(), ctx.split, torch.get_num_threads())
        _fail("backward", rc, q, k)
        return dq, dk, dv, None, None


def flash_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, split: int | None = None) -> Tensor:
    """Causal attention within each sequence of a packed stream: (N, H, d) out, differentiable in q, k, v.

    Runs on up to torch.get_num_threads() threads, one job per (sequence, kv head). A sequence whose
    work alone exceeds a thread's share (a few long sequences on many cores) is split into chunks of
    256 queries (forward; backward dq) and 256 keys (backward dk, dv), at the price of recomputing
    the backward's probabilities once more for its dq chunks. split: None for that choice, 0 never
    split, or a chunk size (a multiple of 64) for every longer sequence. The result is bit for bit the
    same for any split and any thread count: each value is computed by the same blocks in the same
    order (tested)."""
    if split is not None and (split < 0 or split % 64):
        raise ValueError(f"cpu_flash.flash_varlen: split must be None, 0 or a multiple of 64, got {split}")
    return _FlashVarlen.apply(*_checked(q, k, v, cu_seqlens), -1 if split is None else split)
