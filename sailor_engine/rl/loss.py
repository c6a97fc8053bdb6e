"""The RL objective of one micro-batch, normalised by global counts so gradients never depend on layout.

Peers have shipped losses normalised per micro-batch and then scaled by 1/grad_accum: a biased
estimate whenever micro-batches hold different numbers of tokens. Here every aggregation mode
divides by counts over the whole optimizer step (all micro-batches on all DP ranks), counted from
the loss masks before any backward, so the sum of the micro-batch losses is exactly the full-batch
loss and so is the summed gradient, whatever the micro-batch split or the DP degree.

    norm = global_norm(masks_of_all_micro_batches, seq_ids_of_all, dp_group=dp_group)
    for mb in micro_batches:
        loss, stats = rl_loss(mb.logp, mb.old_logp, mb.advantages, mb.loss_mask, norm, cfg.algo,
                              seq_ids=mb.seq_ids)
        loss.backward()                      # then sum-reduce gradients over DP

Layouts: padded `logp: (B, T)` with `advantages: (B,)`, or packed `logp: (N,)` with
`seq_ids: (N,)` int64 in [0, S) and `advantages: (S,)`. A sequence must lie entirely in one
micro-batch. Aggregation modes (L = per-token loss, m = loss mask, n_s = loss tokens of sequence s,
N_tok = global loss tokens, S = global sequences with n_s > 0):

    token-mean                 sum L*m / N_tok                          (DAPO, WebSailor)
    seq-mean-token-sum         sum L*m / S
    seq-mean-token-mean        sum_s (sum_t L*m / n_s) / S              (GRPO paper)
    seq-mean-token-sum-norm    sum L*m / (S * norm_length)              (Dr.GRPO)

The clipped surrogate itself is sailor_engine.kernels.policy_loss (per token); GSPO's sequence-level
ratio, which the kernel does not cover, is gspo_loss below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sailor_engine.kernels.policy_loss import policy_loss
from sailor_engine.rl.config import AlgoConfig

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 for any arithmetic here: a bf16 sum over 10^5 tokens keeps ~3 significant digits."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass(frozen=True)
class LossNorm:
    """Global divisors of one optimizer step (all micro-batches x all DP ranks)."""

    num_tokens: int  # loss tokens (mask != 0)
    num_seqs: int  # sequences with at least one loss token
    dp_scale: float = 1.0  # DP size when the DP gradient reduction averages (DDP, FSDP), else 1


def seq_ids_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """cu_seqlens: (S + 1,) int -> seq_ids: (N,) int64, the sequence of each packed token."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)


def _seq_sum(x: torch.Tensor, seq_ids: torch.Tensor | None, num_seqs: int) -> torch.Tensor:
    """Per-sequence sum: x (B, T) -> (B,), or packed x (N,) with seq_ids -> (num_seqs,)."""
    if x.dim() == 2:
        return x.sum(dim=1)
    if seq_ids is None:
        raise ValueError("seq_ids is required for packed (1-D) inputs")
    return torch.zeros(num_seqs, dtype=x.dtype, device=x.device).index_add_(0, seq_ids, x)


def _count(mask: torch.Tensor, seq_ids: torch.Tensor | None) -> torch.Tensor:
    """(2,) int64 on mask's device: loss tokens, sequences with at least one loss token."""
    m = mask != 0
    if m.dim() == 2:
        return torch.stack([m.sum(), m.any(dim=1).sum()])
    if m.dim() != 1:
        raise ValueError(f"loss_mask must be (B, T) or packed (N,), got {tuple(mask.shape)}")
    if seq_ids is None:
        raise ValueError("seq_ids is required for packed (1-D) loss masks")
    if seq_ids.shape != m.shape:
        raise ValueError(f"seq_ids {tuple(seq_ids.shape)} must match loss_mask {tuple(m.shape)}")
    if m.numel() == 0:
        return torch.zeros(2, dtype=torch.int64, device=m.device)
    per_seq = torch.bincount(seq_ids, weights=m.to(torch.float32))  # loss tokens per sequence
    return torch.stack([m.sum(), (per_seq > 0).sum()])


def global_norm(loss_masks: Sequence[torch.Tensor], seq_ids: Sequence[torch.Tensor | None] | None = None, *,
                dp_group: dist.ProcessGroup | None = None, grad_reduce: str = "sum") -> LossNorm:
    """Count loss tokens and sequences over this rank's micro-batches, then all-reduce over dp_group.

    Call once per optimizer step, before any backward. loss_masks: this rank's micro-batch masks,
    (B, T) or packed (N,) (then seq_ids gives each token's sequence). grad_reduce: "sum" if the DP
    gradient reduction sums, "mean" if it averages (DDP / FSDP default): the loss is then scaled by
    the DP size so the averaged gradient is still the full-batch gradient. Counts stay on the
    masks' device as int64 (exact at any scale): one collective, one host transfer.
    """
    if grad_reduce not in ("sum", "mean"):
        raise ValueError(f"grad_reduce must be 'sum' or 'mean', got {grad_reduce!r}")
    ids = list(seq_ids) if seq_ids is not None else [None] * len(loss_masks)
    if len(ids) != len(loss_masks):
        raise ValueError(f"seq_ids has {len(ids)} entries for {len(loss_masks)} loss masks")
    device = loss_masks[0].device if len(loss_masks) else torch.device("cpu")
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    for mask, sid in zip(loss_masks, ids):
        counts += _count(mask, sid)
    world = 1
    if dp_group is not None:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=dp_group)
        world = dist.get_world_size(dp_group)
    tokens, seqs = counts.tolist()
    return LossNorm(tokens, seqs, float(world) if grad_reduce == "mean" else 1.0)


def aggregate(per_token: torch.Tensor, loss_mask: torch.Tensor, norm: LossNorm, mode: str, *,
              seq_ids: torch.Tensor | None = None, num_seqs: int | None = None,
              norm_length: int | None = None) -> torch.Tensor:
    """This micro-batch's share of the global loss (a scalar); the shares sum to the full-batch value.

    per_token, loss_mask: (B, T) or packed (N,) with seq_ids (N,) and num_seqs (S, needed by
    seq-mean-token-mean). Masked positions are ignored even if per_token holds NaN there.
    """
    if per_token.shape != loss_mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and loss_mask {tuple(loss_mask.shape)} differ")
    x = torch.where(loss_mask != 0, _up(per_token), 0.0)
    # max(.., 1): a step with no loss tokens gives a zero loss (and zero gradient), not NaN.
    seqs = max(norm.num_seqs, 1)
    if mode == "token-mean":
        loss = x.sum() / max(norm.num_tokens, 1)
    elif mode == "seq-mean-token-sum":
        loss = x.sum() / seqs
    elif mode == "seq-mean-token-sum-norm":
        if norm_length is None or norm_length < 1:
            raise ValueError(f"norm_length must be a positive int for seq-mean-token-sum-norm, got {norm_length}")
        loss = x.sum() / (seqs * norm_length)
    elif mode == "seq-mean-token-mean":
        if per_token.dim() == 2:
            s = per_token.shape[0]
        elif seq_ids is None:
            raise ValueError("seq_ids is required for packed (1-D) inputs")
        else:  # without num_seqs, one host sync to size the per-sequence sums
            s = num_seqs if num_seqs is not None else (int(seq_ids.max()) + 1 if seq_ids.numel() else 0)
        lengths = _seq_sum((loss_mask != 0).to(x.dtype), seq_ids, s)
        loss = (_seq_sum(x, seq_ids, s) / lengths.clamp(min=1)).sum() / seqs
    else:
        raise ValueError(f"loss_agg must be one of {AGG_MODES}, got {mode!r}")
    return loss * norm.dp_scale


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled tokens (Schulman's k1, k2, k3).

    k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = exp(x) - x - 1 with x = clamp(ref - logp, +-20),
    output clamped to +-10 (verl's low-variance KL; exp(20) is finite in fp32, the clamp bounds the
    gradient of a rare token far off the reference).
    """
    logp, ref_logp = _up(logp), _up(ref_logp)
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp).square()
    if estimator == "k3":
        x = (ref_logp - logp).clamp(-20.0, 20.0)
        return (torch.exp(x) - x - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"kl_estimator must be k1, k2 or k3, got {estimator!r}")


def gspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, seq_advantages: torch.Tensor, loss_mask: torch.Tensor, *,
              seq_ids: torch.Tensor | None = None, eps_low: float = 3e-4, eps_high: float = 4e-4,
              dual_clip: float | None = None, log_ratio_clamp: float = 20.0) -> tuple[torch.Tensor, dict]:
    """GSPO: one importance ratio per sequence, s_i = exp(mean over its loss tokens of logp - old_logp).

    Sequence loss L_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high)) (dual clip for A_i < 0:
    min(L_i, -A_i c)), returned broadcast to every loss token of sequence i. Broadcasting keeps the
    paper's gradient: sum_t dL_i/dlogp_t over the n_i copies equals GSPO-token's, so any aggregation
    mode applies (seq-mean-token-mean reproduces GSPO exactly). logp, old_logp, loss_mask: (B, T) or
    packed (N,) with seq_ids; seq_advantages: (S,). Default eps are GSPO's (3e-4 / 4e-4). Computes
    in fp32 (float64 for float64 inputs), like the kernel.
    """
    m = loss_mask != 0
    num_seqs = seq_advantages.shape[0]
    delta = torch.where(m, _up(logp) - _up(old_logp), 0.0)
    lengths = _seq_sum(m.to(delta.dtype), seq_ids, num_seqs)
    log_s = (_seq_sum(delta, seq_ids, num_seqs) / lengths.clamp(min=1)).clamp(-log_ratio_clamp, log_ratio_clamp)
    s = torch.exp(log_s)
    a = seq_advantages.to(s.dtype)
    seq_loss = torch.maximum(-a * s, -a * s.clamp(1.0 - eps_low, 1.0 + eps_high))
    if dual_clip is not None:
        seq_loss = torch.where(a < 0, torch.minimum(seq_loss, -a * dual_clip), seq_loss)
    per_token = seq_loss[:, None].expand_as(logp) if logp.dim() == 2 else seq_loss[seq_ids]
    per_token = torch.where(m, per_token, 0.0)
    live = lengths > 0
    n = live.sum().clamp(min=1)
    sd, zero = s.detach(), s.new_zeros(())
    frac = lambda b: (b & live).sum() / n  # noqa: E731
    # Same keys as the kernel's PolicyLossStats; ratios and clip fractions are per sequence here.
    stats = dict(num_tokens=m.sum(), clip_frac_low=frac((a < 0) & (sd < 1 - eps_low)),
                 clip_frac_high=frac((a > 0) & (sd > 1 + eps_high)),
                 dual_clip_frac=frac((a < 0) & (sd > dual_clip)) if dual_clip is not None else zero,
                 ratio_mean=torch.where(live, sd, 0.0).sum() / n, ratio_max=torch.where(live, sd, 0.0).max(),
                 kl_mean=zero)
    return per_token, stats


def token_advantages(advantages: torch.Tensor, logp: torch.Tensor, seq_ids: torch.Tensor | None) -> torch.Tensor:
    """Per-sequence advantages -> per-token: (B,) -> (B, 1) for padded, (S,) -> (N,) via seq_ids."""
    if advantages.shape == logp.shape:
        return advantages
    if logp.dim() == 2 and advantages.shape == (logp.shape[0],):
        return advantages[:, None]
    if logp.dim() == 1 and seq_ids is not None and advantages.dim() == 1:
        return advantages[seq_ids]
    raise ValueError(f"advantages {tuple(advantages.shape)} fit neither per-sequence nor per-token for "
                     f"logp {tuple(logp.shape)}" + (" (packed inputs need seq_ids)" if seq_ids is None else ""))


def rl_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, loss_mask: torch.Tensor,
            norm: LossNorm, cfg: AlgoConfig, *, seq_ids: torch.Tensor | None = None,
            ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """This micro-batch's share of the step's loss under cfg, and its stats (detached 0-dim tensors,
    means over this micro-batch's loss tokens: weight by stats["num_tokens"] to combine).

    logp (with grad), old_logp, loss_mask, ref_logp, entropy: (B, T) or packed (N,) with seq_ids;
    advantages: per sequence, (B,) or (S,) (per-token also accepted for ratio_level="token").
    ref_logp is required when cfg.kl_coef > 0 (when given, its KL is reported as stats["kl_mean"]);
    a differentiable entropy when cfg.entropy_coef > 0 (the fused log-prob kernel's entropy is
    detached: a metric, not a bonus).
    """
    if logp.shape != old_logp.shape or logp.shape != loss_mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and loss_mask "
                         f"{tuple(loss_mask.shape)} must have one shape")
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError("ref_logp is required when algo.kl_coef > 0")
    if cfg.entropy_coef > 0 and (entropy is None or not entropy.requires_grad):
        raise ValueError("a differentiable entropy is required when algo.entropy_coef > 0")
    if logp.dim() == 2 and advantages.shape == (logp.shape[0], 1):
        advantages = advantages[:, 0]
    per_seq_adv = advantages.shape != logp.shape
    num_seqs = advantages.shape[0] if per_seq_adv else None
    if cfg.ratio_level == "token":
        per_token, kstats = policy_loss(
            logp, old_logp, token_advantages(advantages, logp, seq_ids), loss_mask, eps_low=cfg.eps_low,
            eps_high=cfg.eps_high, dual_clip=cfg.dual_clip, ref_logp=ref_logp, kl_coef=cfg.kl_coef,
            kl_estimator=cfg.kl_estimator, log_ratio_clamp=cfg.log_ratio_clamp)
        stats = kstats.as_dict()
    else:
        if not per_seq_adv:
            raise ValueError("ratio_level='sequence' needs per-sequence advantages (S,), got per-token")
        per_token, stats = gspo_loss(logp, old_logp, advantages, loss_mask, seq_ids=seq_ids, eps_low=cfg.eps_low,
                                     eps_high=cfg.eps_high, dual_clip=cfg.dual_clip,
                                     log_ratio_clamp=cfg.log_ratio_clamp)
        if ref_logp is not None:
            m = loss_mask != 0
            kl = torch.where(m, kl_penalty(logp, ref_logp, cfg.kl_estimator), 0.0)
            stats["kl_mean"] = kl.detach().sum() / m.sum().clamp(min=1)
            if cfg.kl_coef > 0:
                per_token = per_token + cfg.kl_coef * kl
    agg = dict(seq_ids=seq_ids, num_seqs=num_seqs, norm_length=cfg.norm_length)
    loss = aggregate(per_token, loss_mask, norm, cfg.loss_agg, **agg)
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * aggregate(entropy, loss_mask, norm, cfg.loss_agg, **agg)
    return loss, stats
