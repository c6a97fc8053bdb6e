"""The RL algorithm layer between rollouts and kernels: rewards, group advantages, DUPO batches, the loss.

rewards.py (extract, normalise, EM / F1, format, presets v1 / v2) and judge.py (async LLM judge) ->
advantages.py (grpo, leave_one_out, dr_grpo on (num_groups, G)) -> dupo.py (which groups train) ->
loss.py (globally normalised aggregation over kernels.policy_loss). config.py holds AlgoConfig.
"""

from .advantages import compute_advantages, dr_grpo, grpo, leave_one_out
from .config import AlgoConfig, JudgeConfig
from .dupo import (DynamicSampler, GroupBatch, RLBatch, build_batch, dupo_select, finalize, informative_groups,
                   prefilter)
from .judge import HttpJudge, Judge, JudgeError
from .loss import LossNorm, aggregate, global_norm, gspo_loss, kl_penalty, rl_loss, seq_ids_from_cu_seqlens
from .rewards import (RewardBatch, Score, check_format, exact_match, extract_answer, normalize_answer, score,
                      score_batch, score_batch_async, token_f1)

__all__ = [
    "AlgoConfig", "DynamicSampler", "GroupBatch", "HttpJudge", "Judge", "JudgeConfig", "JudgeError", "LossNorm",
    "RLBatch", "RewardBatch", "Score", "aggregate", "build_batch", "check_format", "compute_advantages", "dr_grpo",
    "dupo_select", "exact_match", "extract_answer", "finalize", "global_norm", "grpo", "gspo_loss",
    "informative_groups", "kl_penalty", "leave_one_out", "normalize_answer", "prefilter", "rl_loss", "score",
    "score_batch", "score_batch_async", "seq_ids_from_cu_seqlens", "token_f1",
]
