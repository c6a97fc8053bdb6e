"""Plain PyTorch references for every kernel in sailor_engine.kernels.

Used by the tests (run in float64 they are the ground truth), by the benchmarks (as the naive
peer) and as readable specifications of what each kernel computes.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------
# fused linear log-prob
# ---------------------------------------------------------------------------------------------


def linear_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(targets) under softmax((hidden @ weight.T + bias) / T), written straight from the formula.

    hidden: (N, H), weight: (V, H), bias: (V,), targets: (N,) -> logp (N,) [, entropy (N,)].
    Materialises (N, V) logits and computes in the input dtype (float64 for ground truth; bf16 in,
    bf16 logits: the same-dtype baseline). Rows with targets == ignore_index give logp 0, entropy 0.
    Differentiable through autograd.
    """
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).long()
    logp = torch.where(valid, logprobs.gather(-1, safe[..., None]).squeeze(-1), 0.0)
    if not return_entropy:
        return logp
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, torch.where(valid, entropy, 0.0)


def naive_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The usual trainer code, the benchmarks' naive peer: logits -> fp32 -> log_softmax -> gather.

    hidden: (N, H), weight: (V, H), targets: (N,) in [0, V) -> logp (N,) fp32. Holds (N, V) logits.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# policy loss
# ---------------------------------------------------------------------------------------------


def policy_loss_reference(
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped policy-gradient loss (+ KL penalty), written straight from the formulas.

    logp, old_logp, loss_mask, ref_logp: (..., T); advantages: (..., T) per token, or (...,) /
    (..., 1) per sequence. Computes in the promoted dtype of the float inputs (float64 for ground
    truth; bf16 in, bf16 math: the naive peer). Differentiable through autograd w.r.t. logp.

        r = exp(clamp(logp - old_logp, +-log_ratio_clamp))
        L = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));  A < 0: L = min(L, -A dual_clip)
        loss = where(mask, L + kl_coef KL, 0)
        KL: k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = clamp(e^x - 1 - x, +-10), x = clamp(ref - logp, +-20)

    Masked tokens are replaced by zeros before any arithmetic (so inf/NaN there reach neither
    the loss nor, through torch.where's backward, the gradient) and zeroed after. Stats: the
    kernel's PolicyLossStats fields as a dict, over unmasked tokens only (0 when there are none).
    """
    dtype = logp.dtype
    for t in (old_logp, advantages, ref_logp):
        dtype = dtype if t is None else torch.promote_types(dtype, t.dtype)
    m = loss_mask != 0
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    lp = torch.where(m, logp.to(dtype), zero)
    old = torch.where(m, old_logp.to(dtype), zero)
    a = torch.where(m, advantages.to(dtype).expand_as(logp), zero)

    ratio = torch.exp(torch.clamp(lp - old, -log_ratio_clamp, log_ratio_clamp))
    loss = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high))
    if dual_clip is not None:
        loss = torch.where(a < 0, torch.minimum(loss, -a * dual_clip), loss)

    kl = zero
    if ref_logp is not None:
        ref = torch.where(m, ref_logp.to(dtype), zero)
        if kl_estimator == "k1":
            kl = lp - ref
        elif kl_estimator == "k2":
            kl = 0.5 * (lp - ref) ** 2
        elif kl_estimator == "k3":
            x = torch.clamp(ref - lp, -20.0, 20.0)
            kl = torch.clamp(torch.expm1(x) - x, -10.0, 10.0)  # = e^x - x - 1, accurate near x = 0
        else:
            raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {kl_estimator!r}")
        if kl_coef != 0.0:
            loss = loss + kl_coef * kl
    loss = torch.where(m, loss, zero)

    with torch.no_grad():
        n = m.sum()
        denom = n.clamp(min=1).to(dtype)
        r, ad = ratio.detach(), a.detach()

        def mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(m, x.to(dtype), zero).sum() / denom

        stats = {
            "num_tokens": n,
            "clip_frac_low": mean((ad < 0) & (r < 1.0 - eps_low)),
            "clip_frac_high": mean((ad > 0) & (r > 1.0 + eps_high)),
            "dual_clip_frac": zero if dual_clip is None else mean((ad < 0) & (r > dual_clip)),
            "ratio_mean": mean(r),
            "ratio_max": torch.where(m, r, zero).amax() if r.numel() else zero,
            "kl_mean": zero if ref_logp is None else mean(kl.detach().expand_as(r)),
        }
    return loss, stats


# ---------------------------------------------------------------------------------------------
# decode attention over a slab KV cache
# ---------------------------------------------------------------------------------------------


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    nvis: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """One query token per row over the first nvis[b] keys of cache row slots[b], written per row.

    q: (B, H, D); k_cache: (S, KVH, D, CAP) (keys transposed); v_cache: (S, KVH, CAP, D); slots, nvis:
    (B,). Query head h reads kv head h // (H // KVH). Computes in q's dtype (float64 for ground
    truth) and returns (B, H, D).
    """
    B, H, D = q.shape
    kvh = k_cache.shape[1]
    scale = D**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    for b in range(B):
        s, n = int(slots[b]), int(nvis[b])
        for h in range(H):
            keys = k_cache[s, h // (H // kvh), :, :n].to(q.dtype)  # (D, n)
            vals = v_cache[s, h // (H // kvh), :n].to(q.dtype)  # (n, D)
            out[b, h] = torch.softmax((q[b, h] @ keys) * scale, dim=-1) @ vals
    return out


# ---------------------------------------------------------------------------------------------
# causal varlen attention (training)
# ---------------------------------------------------------------------------------------------


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(D)) v within each sequence of a packed stream, written per sequence.

    q: (N, H, D); k, v: (N, KVH, D); sequence s holds tokens [cu_seqlens[s], cu_seqlens[s+1]). Query
    head h reads kv head h // (H // KVH). Computes in q's dtype (float64 for ground truth), and is
    differentiable, so its gradients are the reference for a backward too. Returns (N, H, D).
    """
    H, D = q.shape[1:]
    cu = [int(c) for c in cu_seqlens]
    out = []
    for a, b in zip(cu[:-1], cu[1:]):
        qs = q[a:b].transpose(0, 1)  # (H, L, D)
        ks, vs = (x[a:b].to(q.dtype).transpose(0, 1).repeat_interleave(H // k.shape[1], 0) for x in (k, v))
        s = (qs @ ks.transpose(1, 2)) * D**-0.5
        s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        out.append((s.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(out) if out else q.new_empty(q.shape)
