"""Algorithm section of the config: advantages, batch construction, loss and reward of one RL run.

A frozen msgspec Struct (validated on decode, hashable); sailor_engine.config composes it with the
other sections.

Presets. `preset` names a published recipe; it supplies every *recipe field* (marked "preset" below)
that the config leaves unset, and fields set explicitly always win:

    algo: {preset: sailor_v2}                  # WebSailor-V2 as published
    algo: {preset: dupo, loss_agg: seq-mean-token-mean}   # V1 with one change
    AlgoConfig(preset="custom", advantage="dr_grpo")       # plain GRPO base, one change

- `dupo`      WebSailor V1: GRPO advantages (std-normalised), token-mean loss, duplicating sampling,
              pre-filter of solved questions, reward 0.1 format + 0.9 answer, 4 updates per batch
              (batch 128 questions, mini-batch 32).
- `sailor_v2` WebSailor-V2: leave-one-out advantages (no std), token-mean loss, strictly on-policy
              (1 update per batch), no duplication, truncated negatives excluded from the loss,
              0/1 correctness reward, pre-filter of solved and always-failed questions.
- `custom`    a neutral base: GRPO, token-mean, no duplication or dynamic sampling, no pre-filter,
              reward v1, 1 update per batch.

After construction every field holds a concrete value (the resolved recipe), so encoding a config
and decoding it again gives an equal config.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType
from msgspec.structs import force_setattr

Preset = Literal["dupo", "sailor_v2", "custom"]
Advantage = Literal["grpo", "leave_one_out", "dr_grpo"]
LossAgg = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
Prefilter = Literal["none", "solved", "solved_or_failed"]

# The recipe fields each preset fixes; everything else has one ordinary default.
PRESETS: dict[str, dict[str, object]] = {
    "dupo": dict(advantage="grpo", loss_agg="token-mean", dupo=True, dynamic_sampling=False,
                 exclude_truncated_negatives=False, reward="v1", prefilter="solved", updates_per_batch=4),
    "sailor_v2": dict(advantage="leave_one_out", loss_agg="token-mean", dupo=False, dynamic_sampling=False,
                      exclude_truncated_negatives=True, reward="v2", prefilter="solved_or_failed",
                      updates_per_batch=1),
    "custom": dict(advantage="grpo", loss_agg="token-mean", dupo=False, dynamic_sampling=False,
                   exclude_truncated_negatives=False, reward="v1", prefilter="none", updates_per_batch=1),
}


class JudgeConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """An OpenAI-compatible chat-completions endpoint that judges answers (rl/judge.py)."""

    base_url: Annotated[str, Meta(min_length=1, description="Endpoint root, e.g. http://127.0.0.1:8000/v1.")]
    model: Annotated[str, Meta(min_length=1, description="Model name sent in the request.")]
    api_key_env: Annotated[
        str | None, Meta(description="Environment variable holding the API key; None sends no key."),
    ] = None
    timeout_s: Annotated[float, Meta(gt=0, description="Per-request timeout in seconds.")] = 30.0
    max_retries: Annotated[
        int, Meta(ge=0, description="Retries after a failed request before falling back to exact match."),
    ] = 2
    max_concurrency: Annotated[int, Meta(ge=1, description="Requests in flight at once.")] = 16


class AlgoConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One RL algorithm: how rewards become advantages, which groups train, and how the loss is reduced."""

    preset: Annotated[
        Preset, Meta(description="Recipe supplying every unset preset field: dupo (V1), sailor_v2, custom."),
    ] = "dupo"

    # -- advantages (preset: advantage) --
    advantage: Annotated[
        Advantage, Meta(description="preset. Group advantage: grpo (mean/std), leave_one_out, dr_grpo (mean only)."),
    ] | UnsetType = UNSET
    group_size: Annotated[int, Meta(ge=2, description="Rollouts per question (G).")] = 8
    std_eps: Annotated[
        float, Meta(ge=0, description="Added to the unbiased group std in grpo (verl 1e-6, TRL 1e-4)."),
    ] = 1e-6

    # -- policy loss --
    eps_low: Annotated[float, Meta(gt=0, lt=1, description="Lower clip: ratio floored at 1 - eps_low for A < 0.")] = 0.2
    eps_high: Annotated[
        float, Meta(gt=0, description="Upper clip (clip-higher): ratio capped at 1 + eps_high for A > 0."),
    ] = 0.28
    dual_clip: Annotated[
        float | None, Meta(description="Dual clip: loss of A < 0 tokens bounded by -A*c, c > 1; None: off."),
    ] = None
    ratio_level: Annotated[
        Literal["token", "sequence"],
        Meta(description="Ratio per token, or per sequence (GSPO: exp of the mean log-ratio)."),
    ] = "token"
    log_ratio_clamp: Annotated[
        float, Meta(gt=0, description="logp - old_logp clamped to +-this before exp (verl: 20)."),
    ] = 20.0
    loss_agg: Annotated[
        LossAgg, Meta(description="preset. Reduction of per-token losses, normalised by global counts."),
    ] | UnsetType = UNSET
    norm_length: Annotated[
        int | None, Meta(description="Fixed divisor for seq-mean-token-sum-norm (Dr.GRPO: the max response length)."),
    ] = None
    kl_coef: Annotated[
        float, Meta(ge=0, description="Weight of the KL penalty to the reference policy; 0 needs no reference."),
    ] = 0.0
    kl_estimator: Annotated[
        Literal["k1", "k2", "k3"],
        Meta(description="KL estimator: k1 = logp - ref, k2 = k1^2 / 2, k3 = e^x - x - 1, x = ref - logp."),
    ] = "k3"
    entropy_coef: Annotated[float, Meta(ge=0, description="Weight of the entropy bonus (paper: 0).")] = 0.0
    updates_per_batch: Annotated[
        int, Meta(ge=1, description="preset. Optimizer steps per rollout batch; 1 is strictly on-policy."),
    ] | UnsetType = UNSET

    # -- batch construction (preset: dupo, dynamic_sampling, exclude_truncated_negatives, prefilter) --
    dupo: Annotated[
        bool, Meta(description="preset. Drop zero-variance groups and refill by duplicating informative groups."),
    ] | UnsetType = UNSET
    zero_variance: Annotated[
        Literal["correctness", "reward_std"],
        Meta(description="Uninformative group: all equally correct (Eq. 3), or zero reward std."),
    ] = "correctness"
    dynamic_sampling: Annotated[
        bool, Meta(description="preset. DAPO: drop zero-variance groups, draw new ones until full."),
    ] | UnsetType = UNSET
    max_sampling_rounds: Annotated[
        int, Meta(ge=1, description="Dynamic sampling: rollout rounds before a partial batch trains."),
    ] = 4
    exclude_truncated_negatives: Annotated[
        bool, Meta(description="preset. V2: incorrect trajectories cut at the length/turn limit get loss mask 0."),
    ] | UnsetType = UNSET
    prefilter: Annotated[
        Prefilter, Meta(description="preset. Before RL, drop questions all G rollouts solve (or also all fail)."),
    ] | UnsetType = UNSET
    seed: Annotated[int, Meta(ge=0, description="Seed of the duplication generator (advanced once per batch).")] = 0

    # -- reward (preset: reward) --
    reward: Annotated[
        Literal["v1", "v2"],
        Meta(description="preset. v1: weighted format + answer; v2: 0/1 correct - format_penalty."),
    ] | UnsetType = UNSET
    format_weight: Annotated[float, Meta(ge=0, description="v1 weight of the format reward.")] = 0.1
    answer_weight: Annotated[float, Meta(ge=0, description="v1 weight of the answer reward.")] = 0.9
    answer_metric: Annotated[
        Literal["exact_match", "f1"],
        Meta(description="v1 answer term: exact match or token F1 over aliases; a judge overrides."),
    ] = "exact_match"
    format_penalty: Annotated[
        float, Meta(ge=0, description="v2: subtracted from the reward of a malformed trajectory (0: off)."),
    ] = 0.0
    judge: Annotated[
        JudgeConfig | None, Meta(description="LLM judge endpoint for answer correctness; None: offline metric only."),
    ] = None

    def __post_init__(self) -> None:
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is UNSET:
                force_setattr(self, name, value)
        if self.dupo and self.dynamic_sampling:
            raise ValueError("algo.dupo and algo.dynamic_sampling are alternatives; enable at most one")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"algo.dual_clip must be > 1 (got {self.dual_clip})")
        if self.loss_agg == "seq-mean-token-sum-norm" and (self.norm_length is None or self.norm_length < 1):
            raise ValueError("algo.norm_length must be a positive int when algo.loss_agg is seq-mean-token-sum-norm")
        if self.norm_length is not None and self.norm_length < 1:
            raise ValueError(f"algo.norm_length must be >= 1 (got {self.norm_length})")
