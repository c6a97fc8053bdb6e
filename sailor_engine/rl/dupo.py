"""Which rollout groups a step trains on: DUPO duplicating sampling, DAPO dynamic sampling, pre-filter.

A group (the G rollouts of one question) whose rollouts are all equally good carries no signal
(0 < #correct < G, WebSailor Eq. 3). DUPO drops such groups and refills the freed slots by
duplicating informative groups of the same batch, so the batch stays full without new rollouts;
DAPO's dynamic sampling instead keeps generating new groups until the batch is full. WebSailor-V2
trains on every group but gives incorrect trajectories cut at the length / turn limit loss mask 0.

    g = torch.Generator().manual_seed(cfg.seed)           # once per run; checkpoint g.get_state()
    batch = build_batch(rewards, correct, truncated, cfg, g)
    if batch.skip_reason: log and skip the step
    else: train on groups batch.index with batch.advantages, loss mask * batch.seq_keep

Shapes: rewards, correct, truncated: (num_groups, G); batch slots B = num_groups (DUPO) or the
target (dynamic sampling). Under data parallelism build the batch from the *global* groups, with
the same generator state on every rank (or on one rank, then broadcast), and shard the slots. `correct` is the answer verdict, `truncated` means the rollout ended at
the length or turn limit without a final answer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from sailor_engine.rl.advantages import compute_advantages
from sailor_engine.rl.config import AlgoConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupBatch:
    """The groups one step trains on, as indices into the rolled-out groups."""

    index: torch.Tensor  # (B,) int64: source group of each batch slot
    duplicate: torch.Tensor  # (B,) bool: slot holds a copy of a group already in the batch
    stats: dict[str, int] = field(default_factory=dict)
    skip_reason: str | None = None


@dataclass(frozen=True)
class RLBatch:
    """A ready-to-train batch: per-slot advantages and sequence keep mask."""

    index: torch.Tensor  # (B,) int64 source group per slot
    duplicate: torch.Tensor  # (B,) bool
    advantages: torch.Tensor  # (B, G) computed on the source groups, then gathered
    seq_keep: torch.Tensor  # (B, G) bool: False = whole trajectory out of the loss (V2 exclusion)
    stats: dict[str, int]
    skip_reason: str | None


def _check(correct: torch.Tensor, *others: tuple[str, torch.Tensor | None]) -> None:
    if correct.dim() != 2 or correct.dtype != torch.bool:
        raise ValueError(f"correct must be a (num_groups, G) bool tensor, got {correct.dtype} {tuple(correct.shape)}")
    for name, t in others:
        if t is not None and t.shape != correct.shape:
            raise ValueError(f"{name} must have the shape of correct {tuple(correct.shape)}, got {tuple(t.shape)}")
        if name == "truncated" and t is not None and t.dtype != torch.bool:
            raise ValueError(f"truncated must be a bool tensor, got {t.dtype}")


def prefilter(correct: torch.Tensor, mode: str = "solved") -> tuple[torch.Tensor, dict[str, int]]:
    """Questions to keep for RL, from G rollouts of the cold-started policy. correct: (Q, G) bool.

    mode: "none" keeps all, "solved" drops questions solved by every rollout (V1), "solved_or_failed"
    also drops those no rollout solved (V2 data curation). Returns keep (Q,) bool and counts.
    """
    _check(correct)
    n = correct.sum(dim=1)
    solved, failed = n == correct.shape[1], n == 0
    if mode == "none":
        keep = torch.ones_like(solved)
    elif mode == "solved":
        keep = ~solved
    elif mode == "solved_or_failed":
        keep = ~(solved | failed)
    else:
        raise ValueError(f"prefilter mode must be none, solved or solved_or_failed, got {mode!r}")
    stats = dict(questions=len(keep), kept=int(keep.sum()), solved=int(solved.sum()), failed=int(failed.sum()))
    return keep, stats


def informative_groups(rewards: torch.Tensor, correct: torch.Tensor, criterion: str = "correctness") -> torch.Tensor:
    """(num_groups,) bool: the group carries signal.

    criterion "correctness": 0 < #correct < G (Eq. 3). "reward_std": rewards not all equal (exactly;
    with a format term an all-wrong group can still be informative).
    """
    _check(correct, ("rewards", rewards))
    if criterion == "correctness":
        n = correct.sum(dim=1)
        return (n > 0) & (n < correct.shape[1])
    if criterion == "reward_std":
        return rewards.amax(dim=1) != rewards.amin(dim=1)
    raise ValueError(f"zero_variance criterion must be correctness or reward_std, got {criterion!r}")


def _drop_stats(correct: torch.Tensor, informative: torch.Tensor) -> dict[str, int]:
    n = correct.sum(dim=1)
    dropped = ~informative
    all_correct = int((dropped & (n == correct.shape[1])).sum())
    all_wrong = int((dropped & (n == 0)).sum())
    return dict(groups=len(informative), kept=int(informative.sum()), dropped_all_correct=all_correct,
                dropped_all_wrong=all_wrong, dropped_other=int(dropped.sum()) - all_correct - all_wrong)


def _skip_reason(stats: dict[str, int]) -> str:
    return (f"no informative group among {stats['groups']}: {stats['dropped_all_correct']} all correct, "
            f"{stats['dropped_all_wrong']} all wrong, {stats['dropped_other']} other zero-variance")


def duplicate_fill(informative: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the informative groups and refill the other slots with copies of them.

    informative: (num_groups,) bool with at least one True. Returns index (num_groups,) int64 and
    duplicate (num_groups,) bool. Copies are drawn uniformly at random without replacement in rounds
    (each round a fresh permutation of the informative groups), so copy counts differ by at most one:
    same expectation as i.i.d. draws, lower variance of the gradient estimate.
    """
    kept = informative.nonzero().squeeze(1)
    n_kept, missing = len(kept), len(informative) - len(kept)
    if n_kept == 0:
        raise ValueError("duplicate_fill needs at least one informative group")
    rounds = -(-missing // n_kept)
    perm = torch.rand(rounds, n_kept, generator=generator).argsort(dim=1).flatten()[:missing]
    index = torch.cat([kept, kept[perm.to(kept.device)]])
    duplicate = torch.arange(len(index), device=index.device) >= n_kept
    return index, duplicate


def dupo_select(rewards: torch.Tensor, correct: torch.Tensor, generator: torch.Generator, *,
                criterion: str = "correctness") -> GroupBatch:
    """DUPO: drop zero-variance groups, refill to the full batch by duplication. rewards, correct: (Q, G)."""
    informative = informative_groups(rewards, correct, criterion)
    stats = _drop_stats(correct, informative)
    if stats["kept"] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return GroupBatch(empty, empty.bool(), dict(stats, duplicated=0), _skip_reason(stats))
    index, duplicate = duplicate_fill(informative, generator)
    return GroupBatch(index, duplicate, dict(stats, duplicated=int(duplicate.sum())))


def keep_all(rewards: torch.Tensor, correct: torch.Tensor, *, criterion: str = "correctness") -> GroupBatch:
    """No group selection (V2): every group trains; skipped only if none is informative."""
    informative = informative_groups(rewards, correct, criterion)
    n = len(informative)
    # Zero-variance groups stay in the batch with advantage 0: counted, not dropped.
    stats = dict(groups=n, kept=n, dropped_all_correct=0, dropped_all_wrong=0, dropped_other=0, duplicated=0,
                 zero_variance=int((~informative).sum()))
    reason = None if informative.any() else _skip_reason(_drop_stats(correct, informative))
    return GroupBatch(torch.arange(n), torch.zeros(n, dtype=torch.bool), stats, reason)


class DynamicSampler:
    """DAPO dynamic sampling: accumulate informative groups over generation rounds until full.

        sampler = DynamicSampler(target_groups=128, criterion="correctness", max_rounds=4)
        while not sampler.done:
            rewards, correct = roll_out_more()         # (Q_r, G) each round
            sampler.add(rewards, correct)
        groups = sampler.result()   # index into torch.cat of every round's groups, in order added

    Informative groups beyond the target are discarded (as DAPO does). After max_rounds the batch
    may be partial (stats["partial"] = 1); the global loss normalisation makes that exact.
    """

    def __init__(self, target_groups: int, *, criterion: str = "correctness", max_rounds: int = 4):
        if target_groups < 1 or max_rounds < 1:
            raise ValueError(f"target_groups and max_rounds must be >= 1, got {target_groups}, {max_rounds}")
        self.target, self.criterion, self.max_rounds = target_groups, criterion, max_rounds
        self._index: list[torch.Tensor] = []
        self._seen = self._rounds = 0
        self._stats = dict(groups=0, kept=0, dropped_all_correct=0, dropped_all_wrong=0, dropped_other=0, surplus=0)

    @property
    def num_selected(self) -> int:
        return sum(len(i) for i in self._index)

    @property
    def done(self) -> bool:
        return self.num_selected >= self.target or self._rounds >= self.max_rounds

    def add(self, rewards: torch.Tensor, correct: torch.Tensor) -> None:
        """Add one round of groups. rewards, correct: (Q_r, G)."""
        if self.done:
            raise RuntimeError("DynamicSampler.add after done (batch full or max_rounds reached)")
        informative = informative_groups(rewards, correct, self.criterion)
        for k, v in _drop_stats(correct, informative).items():
            self._stats[k] += v
        room = self.target - self.num_selected
        picked = informative.nonzero().squeeze(1)
        self._stats["surplus"] += max(0, len(picked) - room)
        self._index.append(picked[:room] + self._seen)
        self._seen += len(informative)
        self._rounds += 1

    def result(self) -> GroupBatch:
        index = torch.cat(self._index) if self._index else torch.zeros(0, dtype=torch.long)
        stats = dict(self._stats, rounds=self._rounds, duplicated=0, partial=int(len(index) < self.target))
        stats["kept"] = len(index)
        reason = None
        if len(index) == 0:
            reason = f"dynamic sampling found no informative group in {self._rounds} round(s): " + _skip_reason(stats)
        return GroupBatch(index, torch.zeros(len(index), dtype=torch.bool), stats, reason)


def finalize(rewards: torch.Tensor, correct: torch.Tensor, truncated: torch.Tensor | None, groups: GroupBatch,
             cfg: AlgoConfig) -> RLBatch:
    """Advantages on the source groups, gathered into the batch slots, plus the V2 keep mask.

    rewards, correct, truncated: (num_groups, G) (for dynamic sampling: every round concatenated).
    Excluded trajectories still count in their group's baseline; they only leave the loss.
    """
    _check(correct, ("rewards", rewards), ("truncated", truncated))
    stats = dict(groups.stats)
    if groups.skip_reason is not None:
        log.warning("skipping RL step: %s", groups.skip_reason)
        g = correct.shape[1]
        empty = torch.zeros(0, g, dtype=rewards.dtype)
        return RLBatch(groups.index, groups.duplicate, empty, empty.bool(), dict(stats, excluded_truncated=0),
                       groups.skip_reason)
    adv = compute_advantages(rewards, cfg.advantage, std_eps=cfg.std_eps)[groups.index]
    keep = torch.ones_like(adv, dtype=torch.bool)
    if cfg.exclude_truncated_negatives:
        if truncated is None:
            raise ValueError("truncated is required when algo.exclude_truncated_negatives is on")
        keep = ~(truncated & ~correct)[groups.index]
    stats["excluded_truncated"] = int((~keep).sum())
    stats["batch_groups"] = len(groups.index)
    return RLBatch(groups.index, groups.duplicate, adv, keep, stats, None)


def build_batch(rewards: torch.Tensor, correct: torch.Tensor, truncated: torch.Tensor | None, cfg: AlgoConfig,
                generator: torch.Generator) -> RLBatch:
    """One step's batch under cfg: DUPO duplication if cfg.dupo, else every group (V2).

    For cfg.dynamic_sampling, drive a DynamicSampler across rollout rounds and call finalize.
    """
    if cfg.dynamic_sampling:
        raise ValueError("algo.dynamic_sampling draws new rollouts: use DynamicSampler, then finalize")
    if cfg.dupo:
        groups = dupo_select(rewards, correct, generator, criterion=cfg.zero_variance)
    else:
        groups = keep_all(rewards, correct, criterion=cfg.zero_variance)
    return finalize(rewards, correct, truncated, groups, cfg)
