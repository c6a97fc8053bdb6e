"""The generator's sampling step on the CPU in C (csrc/cpu_sample.c), compiled at first use, via ctypes.

    from sailor_engine.kernels import cpu_sample
    if cpu_sample.available():
        tokens, logps = cpu_sample.sample(logits, temp, u)    # temp 0: greedy row; u: uniforms in [0, 1)

Row r of logits (R, V) fp32: greedy (temp[r] == 0) takes the first index of the maximum; sampled
(temp[r] > 0) draws from softmax(logits[r] / temp[r]) by inverse CDF at u[r], over the full
vocabulary (top-k / top-p truncation stays in torch: generator.sample_from). logps[r] is
log_softmax(logits[r] / T)[token], T = 1 for a greedy row. A row whose maximum is not finite gets
log-prob NaN (and the first NaN or +inf as its token).

Why: torch spends five passes on this, each writing an (R, V) tensor: for 128 sampled rows 1.4 ms a
step at a 4096-token vocabulary, as much as a small model's forward, and 116 ms at Qwen's 151936
(benchmarks/bench_sample.py; here 0.48 and 13.7 ms). Two or three passes over each row here, each
row's arithmetic in a fixed order (its results depend on nothing else: not R, not the thread count),
equal to torch's up to rounding of the exps and their sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native


def available() -> bool:
    """Whether the C kernels are built and loaded (builds them on the first call)."""
    return native.load() is not None


def status() -> str:
    return "available (csrc/cpu_sample.c)" if available() else f"unavailable: {native.error()}"


def sample(logits: Tensor, temp: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """logits (R, V) float32 CPU with unit column stride; temp (R,) >= 0 (0: greedy); u (R,) in [0, 1)
    (read on sampled rows only) -> tokens (R,) int64, log-probs (R,) float32."""
    lib = native.load()
    if lib is None:
        raise RuntimeError(f"cpu_sample: {native.error()}")
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"cpu_sample: logits must be a non-empty (R, V) float32 CPU tensor, got "
                         f"{tuple(logits.shape)} {logits.dtype} on {logits.device}")
    R, V = logits.shape
    if logits.stride(1) != 1 or (R > 1 and logits.stride(0) < V):
        logits = logits.contiguous()
    ldz = logits.stride(0) if R > 1 else V  # a single row's stride(0) is arbitrary (e.g. 1 from a transpose)
    temp = temp.to(torch.float32).contiguous()
    u = u.to(torch.float32).contiguous()
    if temp.shape != (R,) or u.shape != (R,):
        raise ValueError(f"cpu_sample: temp and u must be ({R},), got {tuple(temp.shape)} and {tuple(u.shape)}")
    tokens, logps = torch.empty(R, dtype=torch.int64), torch.empty(R, dtype=torch.float32)
    rc = lib.se_sample(logits.data_ptr(), R, V, ldz, temp.data_ptr(), u.data_ptr(), tokens.data_ptr(),
                       logps.data_ptr(), torch.get_num_threads())
    if rc == -1:
        raise MemoryError("cpu_sample: out of memory for scratch")
    if rc < 0:
        raise ValueError(f"cpu_sample: logits {tuple(logits.shape)} with row stride {ldz} refused (code {rc})")
    if rc:
        r = rc - 1
        raise ValueError(f"cpu_sample: row {r}: temp {float(temp[r])} must be >= 0 and, on a sampled row, "
                         f"u {float(u[r])} in [0, 1)")
    return tokens, logps
