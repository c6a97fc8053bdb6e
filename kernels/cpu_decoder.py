"""A whole decoder forward over a KV cache on the CPU in one C call (csrc/cpu_decoder.c).

    from sailor_engine.kernels import cpu_decoder
    if cpu_decoder.available():
        w = cpu_decoder.DecoderWeights(layers, final_norm, num_heads=H, num_kv_heads=kvh, eps=1e-6)
        hidden = cpu_decoder.forward(w, x, cos, sin, k_cache, v_cache, slots, positions)

Pre-norm decoder layers (RMSNorm, q/k/v projections with optional bias and per-head q/k norms,
rotate-half RoPE, grouped-query attention over the cache, output projection, RMSNorm, SwiGLU MLP),
then the final norm. x (n, hidden) are the embeddings of n new tokens; token i sits at position
positions[i] of cache row slots[i] and its keys and values are written there, layer by layer.
k_cache (layers, S, kv_heads, d, cap) holds keys transposed, v_cache (layers, S, kv_heads, cap, d),
as cpu_attention. cos, sin (n, d): each token's RoPE tables (the caller's scaling). Everything fp32.

Why: a small model's decode step is ~40 small ops per layer, and from Python each costs more in
dispatch than in arithmetic (1.6 ms -> 0.8 ms a step at batch 32 on the benchmark model). The
matmuls go through torch's own BLAS (its exported sgemm_, called with the arguments torch's mm and
addmm pass: the same bits), so only the norms' sums and SiLU's exp round differently from torch's
ops; every sum runs in a fixed order, so a token's output does not depend on its batch, its chunk or
the thread count. Unavailable (status() says why) without the C library or without an sgemm_ in
torch's CPU library; callers then keep their torch path.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from . import native


class LayerWeights(NamedTuple):
    """One layer's tensors, fp32, contiguous. Matrices are (in, out): x @ W, as FusedWeights keeps them."""

    input_norm: Tensor  # (hidden,)
    qkv: Tensor  # (hidden, (H + 2 kv_heads) d): q, k, v columns side by side
    qkv_bias: Tensor | None  # ((H + 2 kv_heads) d,)
    q_norm: Tensor | None  # (d,) per-head norms (Qwen3): both or neither
    k_norm: Tensor | None
    o: Tensor  # (H d, hidden)
    o_bias: Tensor | None
    post_norm: Tensor  # (hidden,)
    gate_up: Tensor  # (hidden, 2 inter): gate, up
    gate_up_bias: Tensor | None
    down: Tensor  # (inter, hidden)
    down_bias: Tensor | None


@functools.cache
def _sgemm() -> tuple[int | None, str | None]:
    """(address, None) of the BLAS sgemm_ torch's own matmuls call (MKL in x86 wheels), or (None, why)."""
    lib_dir = Path(torch.__file__).resolve().parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        try:
            return ctypes.cast(ctypes.CDLL(str(lib_dir / name)).sgemm_, ctypes.c_void_p).value, None
        except (OSError, AttributeError):
            pass
    return None, "torch's CPU library exports no BLAS sgemm_"


def available() -> bool:
    """Whether the C library is built and torch's sgemm_ found (builds the library on the first call)."""
    return native.load() is not None and _sgemm()[0] is not None


def status() -> str:
    if native.load() is None:
        return f"unavailable: {native.error()}"
    addr, why = _sgemm()
    return "available (csrc/cpu_decoder.c)" if addr is not None else f"unavailable: {why}"


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"cpu_decoder: {msg}")


def _fp32(name: str, t: Tensor | None, shape: tuple[int, ...] | None) -> int:
    if t is None:
        _need(shape is None, f"{name} is required")
        return 0
    _need(shape is not None, f"{name} must be None")
    _need(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and tuple(t.shape) == shape,
          f"{name} must be a contiguous float32 CPU tensor of shape {shape}, got {tuple(t.shape)} {t.dtype} on {t.device}")
    return t.data_ptr()


class DecoderWeights:
    """The layers' tensors, checked once, as the pointer table the C side reads. Holds references to
    the tensors (so they stay alive) but no copies: in-place updates of them are seen; build a new one
    when a tensor is replaced."""

    def __init__(self, layers: Sequence[LayerWeights], final_norm: Tensor, *, num_heads: int, num_kv_heads: int,
                 eps: float):
        _need(len(layers) >= 1, "need at least one layer")
        _need(num_kv_heads >= 1 and num_heads % num_kv_heads == 0,
              f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        hid = final_norm.shape[0]
        qkv_cols = layers[0].qkv.shape[-1]
        _need(qkv_cols % (num_heads + 2 * num_kv_heads) == 0, f"qkv has {qkv_cols} columns, not (H + 2 kv_heads) d")
        d = qkv_cols // (num_heads + 2 * num_kv_heads)
        _need(d % 2 == 0 and d <= 256, f"head_dim must be even and <= 256, got {d}")
        inter = layers[0].gate_up.shape[-1] // 2
        self.hidden, self.num_heads, self.num_kv_heads, self.head_dim, self.inter = hid, num_heads, num_kv_heads, d, inter
        self.eps = float(eps)
        self.tensors = (tuple(layers), final_norm)
        ptrs = []
        for i, lw in enumerate(layers):
            _need(isinstance(lw, LayerWeights), f"layers[{i}] must be a LayerWeights")
            qk = None if lw.q_norm is None and lw.k_norm is None else (d,)
            shapes = [(hid,), (hid, qkv_cols), (qkv_cols,), qk, qk, (num_heads * d, hid), (hid,), (hid,),
                      (hid, 2 * inter), (2 * inter,), (inter, hid), (hid,)]
            for field, t, shape in zip(LayerWeights._fields, lw, shapes):  # biases may be None, the q/k norms in pairs
                ptrs.append(_fp32(f"layers[{i}].{field}", t, None if field.endswith("bias") and t is None else shape))
        self.final_norm_ptr = _fp32("final_norm", final_norm, (hid,))
        self.table = (ctypes.c_void_p * len(ptrs))(*ptrs)
        self.num_layers = len(layers)


def forward(w: DecoderWeights, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
            positions: Tensor) -> Tensor:
    """x (n, hidden) token embeddings -> (n, hidden) final-norm hidden states; writes each token's keys
    and values into the caches (see the module docstring). x is not modified."""
    lib, gemm = native.load(), _sgemm()[0]
    if lib is None or gemm is None:
        raise RuntimeError(f"cpu_decoder: {status()}")
    n, d = x.shape[0], w.head_dim
    _fp32("x", x, (n, w.hidden))
    _fp32("cos", cos, (n, d))
    _fp32("sin", sin, (n, d))
    _need(k_cache.dim() == 5 and v_cache.dim() == 5, "k_cache, v_cache must be 5-d (layers, S, kv_heads, ...)")
    L, S, kvh, _, cap = k_cache.shape
    _fp32("k_cache", k_cache, (w.num_layers, S, w.num_kv_heads, d, cap))
    _fp32("v_cache", v_cache, (w.num_layers, S, w.num_kv_heads, cap, d))
    _need(cap % 16 == 0, f"the cache capacity must be a multiple of 16, got {cap}")
    slots, positions = slots.to(torch.int64).contiguous(), positions.to(torch.int64).contiguous()
    _need(slots.shape == (n,) and positions.shape == (n,),
          f"slots and positions must be ({n},), got {tuple(slots.shape)}, {tuple(positions.shape)}")
    out = torch.empty_like(x)
    rc = lib.se_decoder(gemm, w.table, w.final_norm_ptr, L, w.hidden, w.num_heads, kvh, d, w.inter, w.eps,
                        x.data_ptr(), n, cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), S, cap,
                        slots.data_ptr(), positions.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if rc == -1:
        raise MemoryError("cpu_decoder: out of memory for scratch")
    if rc == -2:
        raise ValueError(f"cpu_decoder: unsupported shape (heads {w.num_heads}, kv heads {kvh}, head_dim {d}, cap {cap})")
    if rc:
        i = rc - 1
        raise ValueError(f"cpu_decoder: token {i}: slot {int(slots[i])} / position {int(positions[i])} out of range "
                         f"(cache rows {S}, capacity {cap}); nothing was written")
    return out
