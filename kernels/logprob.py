"""Fused linear log-prob: log p(target) under softmax((hidden @ weight.T + bias) / T), never (N, V).

An RL step needs log pi(token) for every policy token; materialising the logits costs N*V*4 bytes
(10.8 GB for 11.6k tokens at a 248k vocab) and a naive backward holds several such tensors. This
module fuses the LM head with the log-softmax and the target gather:

    logp, ent = fused_linear_logprob(hidden, weight, targets, temperature=0.7, return_entropy=True)

hidden (N, H), weight (V_local, H), bias (V_local,), targets (N,) int -> logp (N,) and, on request,
entropy (N,) (differentiable: an entropy bonus; read as a metric it costs no backward work).
Leading dims are allowed: hidden (..., H), targets (...).
logp and entropy are fp32 for fp16/bf16/fp32 inputs (fp64 for fp64): log-probs feed
exp(logp - old_logp), where bf16 rounding (~0.4%) would be a visible ratio error. Gradients flow
to hidden, weight and bias in their own dtype. Rows whose target is `ignore_index` give logp 0,
entropy 0 and zero gradient, and are dropped before the kernels run (in agent RL most tokens are
prompt or tool output). Target validation and that compaction cost one host sync (two when some
rows are ignored); an out-of-range target raises instead of reading a wrong logit.

Numerics. z = (hidden @ weight.T + bias) * (1/T) is accumulated in fp32 (fp64 for fp64 inputs).
The forward keeps per row the running max m, s = sum exp(z - m), a = sum exp(z - m) * (z - m) and
the target logit z_t; partial statistics (vocab splits, tensor-parallel ranks) merge exactly:
    M = max m_k, S = sum s_k e^(m_k - M), A = sum e^(m_k - M) (a_k + s_k (m_k - M))
    logp = (z_t - M) - log S,  entropy = log S - A / S   (lse = M + log S is never formed).
Both are formed from max-relative terms, so neither rounds at the scale of |lse|. The split that
holds the max contributes e^0 = 1 to S, so S >= 1, log S >= 0 and z_t - M <= 0 in floating point
too: logp <= 0 by construction. It is still clamped at 0 (and entropy at >= 0) so that no future change in
summation order can hand a positive log-prob to the policy loss (a known peer bug). The clamp is
not differentiated: the gradient is that of the exact log-prob, g * (onehot - p) / T, plus, when the
entropy is in the loss with upstream grad ge, its own: -ge * p * (log p + H) / T.
The backward recomputes p = exp((z - M) - log S), not exp(z - lse): lse rounds at the scale of
|lse| (~1e-6 at lse ~ 20 in fp32), log S at the scale of log V, and z - M is exact near the max;
the split form measured 1.5-3x smaller dz errors, at or below the reference softmax's.

Design and cost (N tokens, H hidden, V vocab, bf16 on GPU):
- forward, Triton: one fused kernel, grid (row blocks, vocab splits); tl.dot over H per
  (BLOCK_N, BLOCK_V) tile with the online log-sum-exp in registers. 2*N*H*V FLOPs; extra memory
  4 * S * N fp32 for the split statistics, plus M and log S (N,) fp32 saved for the backward.
- backward, Triton + cuBLAS, over row chunks of Nc rows (`_BWD_CHUNK_BYTES` of dz, 1 GiB): a
  Triton kernel recomputes each logits tile (tl.dot) and writes dz = g * (onehot - p) / T in the
  input dtype; cuBLAS computes dH[chunk] = dz @ W and dW += dz^T @ H[chunk] (fp32 accumulation in
  the GEMM; dW is rounded to the input dtype once per chunk, so ceil(N / Nc) roundings in all).
  6*N*H*V FLOPs (recompute, dH, dW); extra memory Nc*V in the input dtype.
  In total 8*N*H*V against the 6*N*H*V of an implementation that keeps the logits: the recompute
  is the price of O(N*H + Nc*V) memory, and caps the 6NHV-roofline fraction at 75% of GEMM peak.
  A fully fused backward does not help: dH = dz @ W reduces over V, so a (BLOCK_N, H) fp32
  accumulator per program (2 MiB at H = 4096) or a recompute per H block would be needed.
- CPU (and `impl="torch"`): the same algorithm in chunked PyTorch, all math in fp32 (fp64).
  Forward: row blocks of R rows x vocab chunks of C columns, one (R, C) buffer reused through
  addmm(out=) and in-place exp. Backward: vocab chunks outside, row blocks inside, so each dW slice
  is written once and dH accumulates in an (N, H) fp32 buffer. Extra memory: R*C (two with
  entropy), plus fp32 copies of hidden and of one weight chunk for low-precision inputs.

Vocab parallel (`tp_group`): weight is this rank's shard, rank r holding rows
[r * V_local, (r + 1) * V_local) of the full vocab (equal shards); targets are global indices.
Each rank merges its own statistics, one all_gather exchanges (4, N) per rank, and every rank
merges them in the same order, so all ranks hold bit-identical logp. hidden must be replicated
across the group: the backward all-reduces dH (in fp32), so do not also pass hidden through a
copy-to-tensor-parallel-region op. dW and db are this rank's shard.

Implementation choice: impl="auto" runs Triton on CUDA (fp16/bf16/fp32) and the PyTorch path
otherwise; "triton" forces the kernels (on CPU only under TRITON_INTERPRET=1, as the tests do);
"torch" forces the chunked PyTorch path.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

# Chunked-PyTorch tile: R rows x C vocab columns, R * C <= _TORCH_TILE_ELEMS (32 MiB of fp32).
# Measured at N=4096, H=512, V=32768 on 2 cores: every C from 512 to 4096 runs the GEMMs at the
# same (peak) speed on a quiet machine; on a loaded one fewer, longer OpenMP regions suffer less
# from a descheduled thread, so C = 2048 (16 chunks), still ~0.07x of naive's peak memory.
_TORCH_TILE_ELEMS = 1 << 23
_TORCH_MAX_ROWS = 4096
# Triton backward: bytes of dz (rows x V, input dtype) per row chunk.
_BWD_CHUNK_BYTES = 1 << 30

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _rows(x: torch.Tensor) -> torch.Tensor:
    # The kernels take any row stride (a row slice of a larger matrix is used in place) but need
    # unit stride along H.
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.compiler.disable  # eager inside compiled models: the chunk loops must not be unrolled into a graph
def fused_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    tp_group: dist.ProcessGroup | None = None,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(targets) under softmax((hidden @ weight.T + bias) / temperature), and optionally entropy.

    hidden: (..., H) floating; weight: (V_local, H) same dtype; bias: (V_local,) or None;
    targets: (...) integer in [0, V_local * tp_size) or ignore_index (logp 0, entropy 0, no grad).
    temperature: > 0, divides the logits (bias included). return_entropy: also return the entropy
    of each row's distribution (differentiable; an entropy left out of the loss adds no backward
    work). tp_group: vocab-parallel group (weight is this rank's shard, hidden and targets
    replicated). impl: "auto" | "triton" | "torch" (see the module docstring).
    Returns logp (...) [, entropy (...)], fp32 (fp64 for fp64 inputs).
    """
    _check(hidden, weight, bias, targets, temperature, impl)
    lead = targets.shape
    h2 = _rows(hidden.reshape(-1, hidden.shape[-1]))
    t1 = targets.reshape(-1).to(torch.int64)
    world = dist.get_world_size(tp_group) if tp_group is not None else 1
    valid = t1 != ignore_index
    n_valid = _count_valid(t1, valid, ignore_index, weight.shape[0] * world)
    keep = None
    if n_valid < t1.numel():
        # Ignored rows (prompt and tool-response tokens: often most of an agent trajectory) cost
        # nothing: the kernels see the kept rows only. index_select's backward gives the ignored
        # rows of hidden exactly zero gradient. Targets are replicated, so all TP ranks agree.
        keep = valid.nonzero().squeeze(1)
        h2, t1 = h2.index_select(0, keep), t1[keep]
    use_triton = _use_triton(impl, h2) and h2.shape[0] > 0  # no empty grids: N = 0 is trivially exact in torch
    out = _LinearLogprob.apply(
        h2, _rows(weight), None if bias is None else bias.contiguous(), t1,
        1.0 / float(temperature), bool(return_entropy), tp_group, use_triton,
    )
    outs = out if return_entropy else (out,)
    if keep is not None:  # ignored rows: logp 0, entropy 0
        outs = tuple(o.new_zeros(valid.shape).index_copy(0, keep, o) for o in outs)
    outs = tuple(o.reshape(lead) for o in outs)
    return outs if return_entropy else outs[0]


class _LinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_t, want_entropy, tp_group, use_triton):
        # targets: (N,) global vocab indices, all valid (ignored rows were dropped by the caller)
        v_local = weight.shape[0]
        offset = dist.get_rank(tp_group) * v_local if tp_group is not None else 0
        local = targets - offset
        # index within this shard, -1 where the target lives on another rank
        tgt = torch.where((local >= 0) & (local < v_local), local, -1)
        if use_triton:
            from . import _logprob_triton as tk

            parts = tk.fwd_stats(hidden, weight, bias, tgt, inv_t, want_entropy)
        else:
            parts = _torch_stats(hidden, weight, bias, tgt, inv_t, want_entropy)
        stats = merge_stats(parts)
        if tp_group is not None:
            gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(gathered, stats, group=tp_group)
            stats = merge_stats(torch.stack(gathered))
        m, log_s, logp, ent = finalize_stats(stats)
        ctx.save_for_backward(hidden, weight, bias, tgt, m, log_s, ent if want_entropy else None)
        ctx.inv_t, ctx.tp_group, ctx.use_triton = inv_t, tp_group, use_triton
        ctx.set_materialize_grads(False)  # an output outside the loss (entropy as a metric) gets None
        return (logp, ent) if want_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, bias, tgt, m, log_s, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if (grad_logp is None and grad_ent is None) or not (need_h or need_w or need_b):
            return (None,) * 8
        g = grad_logp.to(m.dtype).contiguous() if grad_logp is not None else torch.zeros_like(m)
        ge = grad_ent.to(m.dtype).contiguous() if grad_ent is not None else None
        if hidden.shape[0] == 0:  # no tokens: zero grads (the chunk loops below would write nothing)
            dh, dw, db = (torch.zeros_like(x) if need and x is not None else None
                          for x, need in ((hidden, need_h), (weight, need_w), (bias, need_b)))
        else:
            run = _triton_backward if ctx.use_triton else _torch_backward
            dh, dw, db = run(hidden, weight, bias, tgt, m, log_s, g, ctx.inv_t, need_h, need_w, need_b,
                             ge, ent if ge is not None else None)
        if dh is not None and ctx.tp_group is not None:
            # every rank holds the same hidden; its gradient is the sum of the shards' parts
            dh = dh.to(m.dtype)
            dist.all_reduce(dh, group=ctx.tp_group)
        dh = None if dh is None else dh.to(hidden.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, None, None, None, None, None


# --- statistics: merge partials, finish --------------------------------------------------------


def merge_stats(parts: torch.Tensor) -> torch.Tensor:
    """Merge K partial statistics (K, 4, N) -> (4, N); rows are (max m, sum e^(z-m), sum e^(z-m)(z-m), z_t).

    Empty partials (m = -1e30 sentinel, s = a = z_t = 0) are neutral. Deterministic: a fixed-order sum.
    """
    m, s, a, zt = parts.unbind(1)
    big = m.amax(0)
    shift = m - big
    w = torch.exp(shift)
    return torch.stack([big, (s * w).sum(0), (w * (a + s * shift)).sum(0), zt.sum(0)])


def finalize_stats(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(4, N) merged statistics -> max M, log S, logp (clamped <= 0), entropy (clamped >= 0)."""
    m, s, a, zt = stats.unbind(0)
    log_s = torch.log(s)
    # (z_t - M) - log S, not z_t - lse: z_t - M is exact when the target is near the max
    return m, log_s, ((zt - m) - log_s).clamp(max=0.0), (log_s - a / s).clamp(min=0.0)


# --- chunked PyTorch path ----------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_tiles(n: int, v: int) -> tuple[int, int]:
    rows = max(1, min(n, _TORCH_MAX_ROWS))
    cols = max(1, min(v, _TORCH_TILE_ELEMS // rows))
    return rows, cols


def _scaled_logits(h, weight, bias, c0, c1, inv_t, buf):
    """(hidden rows @ weight[c0:c1].T + bias[c0:c1]) * inv_t into a view of buf; h is already fp32/fp64."""
    w = weight[c0:c1].to(h.dtype)
    z = buf[: h.shape[0] * (c1 - c0)].view(h.shape[0], c1 - c0)
    if bias is None:
        torch.mm(h, w.T, out=z)
    else:
        torch.addmm(bias[c0:c1].to(h.dtype), h, w.T, out=z)
    # Scale after the bias, as the reference does: addmm(beta=alpha=1/T) rounds b/T and hW/T
    # separately and measured ~1.6x the logits error.
    if inv_t != 1.0:
        z.mul_(inv_t)
    return z, w


def _torch_stats(hidden, weight, bias, tgt, inv_t, want_entropy) -> torch.Tensor:
    """Statistics (1, 4, N) of this weight's logits, streaming R x C tiles through one buffer."""
    n, v = hidden.shape[0], weight.shape[0]
    h = hidden.to(_compute_dtype(hidden.dtype))
    rows, cols = _torch_tiles(n, v)
    buf = h.new_empty(rows * cols)
    ebuf = h.new_empty(rows * cols) if want_entropy else None
    stats = h.new_zeros(4, n)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        hr, tr = h[r0:r1], tgt[r0:r1]
        m = s = a = zt = None
        for c0 in range(0, v, cols):
            c1 = min(v, c0 + cols)
            z, _ = _scaled_logits(hr, weight, bias, c0, c1, inv_t, buf)
            here = (tr >= c0) & (tr < c1)
            z_here = z.gather(1, (tr - c0).clamp(0, c1 - c0 - 1)[:, None]).squeeze(1)
            zt = torch.where(here, z_here, 0.0 if zt is None else zt)
            m_new = z.amax(1) if m is None else torch.maximum(m, z.amax(1))
            z.sub_(m_new[:, None])
            if want_entropy:
                e = torch.exp(z, out=ebuf[: z.numel()].view_as(z))
                s_c = e.sum(1)
                a_c = e.mul_(z).sum(1)
            else:
                s_c, a_c = z.exp_().sum(1), None
            if m is None:
                s, a = s_c, a_c
            else:
                shift = m - m_new
                alpha = torch.exp(shift)
                if want_entropy:
                    a = alpha * (a + s * shift) + a_c
                s = s * alpha + s_c
            m = m_new
        stats[0, r0:r1], stats[1, r0:r1], stats[3, r0:r1] = m, s, zt
        if want_entropy:
            stats[2, r0:r1] = a
    return stats[None]


def _torch_backward(hidden, weight, bias, tgt, m, log_s, g, inv_t, need_h, need_w, need_b, ge=None, ent=None):
    """Grads (dh in the compute dtype, dw, db) by recomputing C-column vocab chunks, R rows at a time.
    ge, ent: the entropy's upstream grad and value (N,), or None (entropy outside the loss)."""
    n, v, width = hidden.shape[0], weight.shape[0], hidden.shape[1]
    cdt = m.dtype
    h = hidden.to(cdt)
    rows, cols = _torch_tiles(n, v)
    buf = h.new_empty(rows * cols)
    tbuf = h.new_empty(rows * cols) if ge is not None else None
    gs = g * inv_t  # d/d(raw logits) = inv_t * g * (onehot - p)
    ges = ge * inv_t if ge is not None else None  # and - inv_t * ge * p * (log p + H) for the entropy
    dh = h.new_zeros(n, width) if need_h else None
    dw = torch.empty_like(weight) if need_w else None
    dw_acc = h.new_empty(cols, width) if need_w and weight.dtype != cdt else None
    db = h.new_empty(v) if need_b else None
    for c0 in range(0, v, cols):
        c1 = min(v, c0 + cols)
        dwc = (dw_acc[: c1 - c0] if dw_acc is not None else dw[c0:c1]) if need_w else None
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            hr, tr = h[r0:r1], tgt[r0:r1]
            z, w = _scaled_logits(hr, weight, bias, c0, c1, inv_t, buf)
            z.sub_(m[r0:r1, None]).sub_(log_s[r0:r1, None])  # log p
            if ges is None:
                z.exp_().mul_(-gs[r0:r1, None])  # -g p / T
            else:  # -p (g + ge (log p + H)) / T
                t = torch.add(z, ent[r0:r1, None], out=tbuf[: z.numel()].view_as(z))
                t.mul_(ges[r0:r1, None]).add_(gs[r0:r1, None])
                z.exp_().mul_(t).neg_()
            here = (tr >= c0) & (tr < c1)
            idx = (tr - c0).clamp(0, c1 - c0 - 1)[:, None]
            z.scatter_add_(1, idx, torch.where(here, gs[r0:r1], 0.0)[:, None])  # + g onehot / T
            if need_h:
                dh[r0:r1].addmm_(z, w)
            if need_w:
                if r0 == 0:
                    torch.mm(z.T, hr, out=dwc)
                else:
                    dwc.addmm_(z.T, hr)
            if need_b:
                db_c = z.sum(0)
                db[c0:c1] = db_c if r0 == 0 else db[c0:c1] + db_c
        if dw_acc is not None:
            dw[c0:c1].copy_(dwc)
    return dh, dw, db


def _triton_backward(hidden, weight, bias, tgt, m, log_s, g, inv_t, need_h, need_w, need_b, ge=None, ent=None):
    """Grads via the Triton dz kernel and cuBLAS GEMMs, over row chunks of _BWD_CHUNK_BYTES of dz."""
    from . import _logprob_triton as tk

    n, v = hidden.shape[0], weight.shape[0]
    rows = max(1, min(n, _BWD_CHUNK_BYTES // (v * hidden.element_size())))
    dz_buf = hidden.new_empty(rows * v)
    dh = torch.empty_like(hidden) if need_h else None
    dw = torch.empty_like(weight) if need_w else None
    db = torch.zeros(v, dtype=torch.float32, device=hidden.device) if need_b else None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        dz = tk.bwd_dlogits(hidden[r0:r1], weight, bias, tgt[r0:r1], m[r0:r1], log_s[r0:r1], g[r0:r1], inv_t,
                            dz_buf[: (r1 - r0) * v].view(r1 - r0, v),
                            None if ge is None else ge[r0:r1], None if ent is None else ent[r0:r1])
        if need_h:
            torch.mm(dz, weight, out=dh[r0:r1])
        if need_w:
            if r0 == 0:
                torch.mm(dz.T, hidden[r0:r1], out=dw)
            else:
                dw.addmm_(dz.T, hidden[r0:r1])
        if need_b:
            db += dz.sum(0, dtype=torch.float32)
    return dh, dw, db


# --- input checks ------------------------------------------------------------------------------


def _use_triton(impl: str, hidden: torch.Tensor) -> bool:
    if impl == "torch":
        return False
    if impl == "auto":
        return hidden.is_cuda and hidden.dtype in _TRITON_DTYPES
    # impl == "triton"
    if hidden.dtype not in _TRITON_DTYPES:
        raise ValueError(f"fused_linear_logprob: impl='triton' supports float16/bfloat16/float32, got {hidden.dtype}")
    if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("fused_linear_logprob: impl='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return True


def _check(hidden, weight, bias, targets, temperature, impl) -> None:
    name = "fused_linear_logprob"
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"{name}: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if not hidden.is_floating_point():
        raise TypeError(f"{name}: hidden must be floating point, got {hidden.dtype}")
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"{name}: hidden must be (..., H) and weight (V, H); got hidden {tuple(hidden.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{name}: weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name}: weight is {tuple(weight.shape)} but hidden has H={hidden.shape[-1]}: "
                         "weight must be (V, H)")
    if weight.shape[0] == 0:
        raise ValueError(f"{name}: weight has an empty vocab (shape {tuple(weight.shape)})")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"{name}: targets must be an integer tensor, got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{name}: targets shape {tuple(targets.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if bias is not None:
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{name}: bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{name}: bias shape {tuple(bias.shape)} must be ({weight.shape[0]},) to match weight")
    for tname, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name}: {tname} is on {t.device} but hidden is on {hidden.device}")
    if not (isinstance(temperature, (int, float)) and 0.0 < float(temperature) < float("inf")):
        raise ValueError(f"{name}: temperature must be a finite number > 0, got {temperature!r}")


def _count_valid(targets: torch.Tensor, valid: torch.Tensor, ignore_index: int, vocab: int) -> int:
    """Number of non-ignored rows; raises on a target outside [0, vocab). One host sync for both."""
    bad = valid & ((targets < 0) | (targets >= vocab))
    n_bad, n_valid = torch.stack([bad.sum(), valid.sum()]).tolist()
    if n_bad:
        first = int(targets[bad][0])
        raise ValueError(f"fused_linear_logprob: targets contain {first}, outside [0, {vocab}) "
                         f"and not ignore_index ({ignore_index})")
    return n_valid
