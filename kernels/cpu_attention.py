"""Cached attention on the CPU in C (csrc/cpu_attention.c), compiled at first use and called via ctypes.

    from sailor_engine.kernels import cpu_attention as ca
    if ca.available():
        ca.append_kv(k_cache, v_cache, k, v, slots, positions)      # one layer's cache, in place
        out = ca.cached_attention(q, k_cache, v_cache, slots, positions + 1)

k_cache (S, kv_heads, d, cap) holds keys transposed, v_cache (S, kv_heads, cap, d); both fp32,
contiguous. Query row i (heads, d) attends over the first nvis[i] positions of cache row slots[i].

Why: a decode step of a small model attends g <= 8 query heads per kv head over one cache row; MKL's
batched GEMMs spend more on per-matrix overhead than on the arithmetic there, and bit-for-bit batch
invariance forced chunked, aligned calls on top (model/attention.py). This kernel computes each query
row on its own, with every sum in a fixed order (see the C file), so a token's output does not depend
on its batch, its chunking (prefill, tool response, decode) or the machine; one code path serves all.

Built with the other C kernels by native.py: no compiler, or SAILOR_ENGINE_NATIVE=0, and `available()`
is False, `status()` says why, and callers keep their torch path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native


def available() -> bool:
    """Whether the C kernels are built and loaded (builds them on the first call)."""
    return native.load() is not None


def status() -> str:
    return "available (csrc/cpu_attention.c)" if available() else f"unavailable: {native.error()}"


def supports(head_dim: int, cap: int) -> bool:
    """Whether the kernel takes caches of this head_dim and position capacity."""
    return 1 <= head_dim <= 256 and cap % 16 == 0


def _check(name: str, t: Tensor, dims: int) -> None:
    if t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != dims:
        raise ValueError(f"cpu_attention: {name} must be a {dims}-d float32 CPU tensor, got "
                         f"{tuple(t.shape)} {t.dtype} on {t.device}")


def _rows(name: str, t: Tensor) -> Tensor:
    """(n, heads, d) float32 with each row's heads and d contiguous (any row stride)."""
    _check(name, t, 3)
    return t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous()


def _index(t: Tensor, n: int) -> Tensor:
    t = t.to(torch.int64).contiguous()
    if t.dim() != 1 or len(t) != n:
        raise ValueError(f"cpu_attention: expected {n} indices, got shape {tuple(t.shape)}")
    return t


def _caches(k_cache: Tensor, v_cache: Tensor) -> tuple[int, int, int, int]:
    _check("k_cache", k_cache, 4)
    _check("v_cache", v_cache, 4)
    S, kvh, d, cap = k_cache.shape
    if tuple(v_cache.shape) != (S, kvh, cap, d) or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or cap % 16:
        raise ValueError(f"cpu_attention: need contiguous k_cache (S, kv_heads, d, cap) and v_cache "
                         f"(S, kv_heads, cap, d) with cap a multiple of 16 (keys are read in blocks of 16), "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    return S, kvh, d, cap


def _fail(lib_fn: str, rc: int, slots: Tensor, other: Tensor, what: str) -> None:
    if rc == -1:
        raise MemoryError(f"cpu_attention.{lib_fn}: out of memory for scratch")
    if rc == -2:
        raise ValueError(f"cpu_attention.{lib_fn}: unsupported shape (need head_dim <= 256)")
    if rc:
        i = rc - 1
        raise ValueError(f"cpu_attention.{lib_fn}: row {i}: slot {int(slots[i])} / {what} {int(other[i])} out of range")


def append_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor, positions: Tensor) -> None:
    """Write k[i], v[i] (kv_heads, d) at position positions[i] of cache row slots[i]."""
    lib = native.load()
    if lib is None:
        raise RuntimeError(f"cpu_attention: {native.error()}")
    S, kvh, d, cap = _caches(k_cache, v_cache)
    k, v = _rows("k", k), _rows("v", v)
    n = k.shape[0]
    if tuple(k.shape[1:]) != (kvh, d) or v.shape != k.shape:
        raise ValueError(f"cpu_attention.append_kv: k, v must be (n, {kvh}, {d}), got {tuple(k.shape)}, {tuple(v.shape)}")
    slots, positions = _index(slots, n), _index(positions, n)
    rc = lib.se_append(k_cache.data_ptr(), v_cache.data_ptr(), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                       slots.data_ptr(), positions.data_ptr(), n, kvh, d, S, cap)
    _fail("append_kv", rc, slots, positions, "position")


def cached_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, nvis: Tensor) -> Tensor:
    """q (n, heads, d) -> (n, heads, d): row i over the first nvis[i] keys of cache row slots[i]
    (softmax(q K^T / sqrt(d)) V, query head j on kv head j // (heads // kv_heads)). Large calls run on
    up to torch.get_num_threads() threads, split by rows: the result does not depend on the count."""
    lib = native.load()
    if lib is None:
        raise RuntimeError(f"cpu_attention: {native.error()}")
    S, kvh, d, cap = _caches(k_cache, v_cache)
    q = _rows("q", q)
    n, H = q.shape[:2]
    if q.shape[2] != d or H % kvh:
        raise ValueError(f"cpu_attention: q (n, heads, {d}) with heads a multiple of {kvh}, got {tuple(q.shape)}")
    slots, nvis = _index(slots, n), _index(nvis, n)
    out = torch.empty(n, H, d)
    rc = lib.se_attend(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
                       nvis.data_ptr(), n, H, kvh, d, S, cap, out.data_ptr(), torch.get_num_threads())
    _fail("cached_attention", rc, slots, nvis, "keys")
    return out
