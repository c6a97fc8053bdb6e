"""Group-relative advantages: one scalar per rollout from the rewards of its group.

All estimators take `rewards: (num_groups, G)` (row = the G rollouts of one question) and return
advantages of the same shape and dtype; the trainer broadcasts each to every policy token of its
rollout. Every estimator has zero mean within each group. Arithmetic is done in float64 (the
tensors are tiny), so results do not depend on the reward dtype beyond the final cast.

    adv = compute_advantages(rewards, "grpo", std_eps=1e-6)

- grpo          (R - mean) / (std + eps), std unbiased (WebSailor V1 / DUPO, verl, TRL)
- leave_one_out R_i - mean_{j != i} R_j = G / (G - 1) * (R - mean)   (WebSailor-V2, RLOO)
- dr_grpo       R - mean, no std division (Dr.GRPO)
"""

from __future__ import annotations

import torch

ESTIMATORS = ("grpo", "leave_one_out", "dr_grpo")


def _check(rewards: torch.Tensor) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2:
        raise ValueError(f"rewards must be a (num_groups, G) tensor, got {getattr(rewards, 'shape', type(rewards))}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be floating point, got {rewards.dtype}")
    if rewards.shape[1] < 2:
        raise ValueError(f"rewards: a group needs G >= 2 rollouts for a relative advantage, got G={rewards.shape[1]}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    return rewards.double()


def _centred(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R - group mean, constant-group mask). The mean of G equal floats can be off by an ulp, so
    constant groups are set to exactly 0 rather than ~1e-17: no signal means no gradient."""
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return torch.where(constant, 0.0, r - r.mean(dim=1, keepdim=True)), constant


def grpo(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(R - group mean) / (unbiased group std + eps). rewards: (num_groups, G).

    A constant group gets advantage exactly 0 (peers get ~1e-11 from the rounding of the mean),
    which also keeps eps = 0 finite.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    r = _check(rewards)
    centred, constant = _centred(r)
    std = r.std(dim=1, keepdim=True, unbiased=True)
    adv = centred / torch.where(constant, 1.0, std + eps)
    return adv.to(rewards.dtype)


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """R_i minus the mean of the other G - 1 rewards of its group. rewards: (num_groups, G)."""
    r = _check(rewards)
    g = r.shape[1]
    # R_i - (sum - R_i) / (G - 1) == G / (G - 1) * (R_i - mean): the RLOO identity, as verl writes it.
    return (_centred(r)[0] * (g / (g - 1))).to(rewards.dtype)


def dr_grpo(rewards: torch.Tensor) -> torch.Tensor:
    """R - group mean, no std normalisation (Dr.GRPO). rewards: (num_groups, G)."""
    r = _check(rewards)
    return _centred(r)[0].to(rewards.dtype)


def compute_advantages(rewards: torch.Tensor, estimator: str, *, std_eps: float = 1e-6) -> torch.Tensor:
    """Dispatch on the estimator name (AlgoConfig.advantage). rewards: (num_groups, G)."""
    if estimator == "grpo":
        return grpo(rewards, std_eps)
    if estimator == "leave_one_out":
        return leave_one_out(rewards)
    if estimator == "dr_grpo":
        return dr_grpo(rewards)
    raise ValueError(f"advantage estimator must be one of {ESTIMATORS}, got {estimator!r}")
