"""The slab KV cache of the generator and of pipeline decode: one preallocated row per slot.

    cache = KVCache(num_layers, num_slots, max_seq_len, num_kv_heads, head_dim)
    cache.lengths[slot]      # valid positions in a row; reset(slots) frees rows without a copy

Its attention (prefill, resume, decode over the cache) is in model/attention.py.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch
from torch import Tensor


_ALIGN = 16  # positions: 64 bytes of fp32, the alignment MKL's kernels round the same way at (see OneTokenAttention)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class KVCache:
    """A preallocated slab KV cache: one (max_seq_len)-long row per slot, for every layer.

    k: (num_layers, num_slots, num_kv_heads, head_dim, max_seq_len): keys stored *transposed*, so
    that one-token decode multiplies q (g, d) @ K^T (d, k_max) with no transpose (that product runs
    ~1.4x faster than over (k_max, d) rows on CPU, where decode attention is bound by walking the cache).
    v: (num_layers, num_slots, num_kv_heads, max_seq_len, head_dim), as attention reads it.
    (The position axis is allocated rounded up to a multiple of _ALIGN: see OneTokenAttention.)
    lengths: (num_slots,) int64, the number of valid positions in each slot. A slot is freed by
    setting its length to 0 (no copy).
    """

    def __init__(self, num_layers: int, num_slots: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        cap = _aligned(max_seq_len)
        self.k = _zeros_huge_pages((num_layers, num_slots, num_kv_heads, head_dim, cap), dtype, device)
        self.v = _zeros_huge_pages((num_layers, num_slots, num_kv_heads, cap, head_dim), dtype, device)
        self.lengths = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self.max_seq_len = max_seq_len

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    def reset(self, slots: Tensor | list[int] | None = None) -> None:
        if slots is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(slots, device=self.lengths.device)] = 0


_MADV_HUGEPAGE = 14  # Linux
_HUGE_PAGE = 2 << 20


@functools.cache
def _madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def _zeros_huge_pages(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """torch.zeros, but a CPU tensor of several huge pages asks Linux for them (madvise(MADV_HUGEPAGE))
    before its first touch. Decode reads each kv head's cache rows (`head_dim` rows `cap` floats apart
    for keys) across the whole slab: with 4 KB pages a step of a 2k-position cache walks thousands of
    pages, and TLB misses cost it ~1.4x (with transparent huge pages in "madvise" mode, the common
    default). Only a hint: where it is refused (another OS, THP off) the tensor is the same."""
    t = torch.empty(shape, dtype=dtype, device=device)
    nbytes = t.numel() * t.element_size()
    madvise = _madvise() if t.device.type == "cpu" and sys.platform.startswith("linux") else None
    if madvise is not None and nbytes >= 4 * _HUGE_PAGE:
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # the whole huge pages inside the buffer
        end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        madvise(start, end - start, _MADV_HUGEPAGE)
    return t.zero_()
