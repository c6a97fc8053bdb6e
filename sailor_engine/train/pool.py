"""The RL question pool: which training tasks an RL step may draw, pre-filtered before RL and curated during it.

A question whose G rollouts are all correct (or all wrong) gives a zero-variance group: no gradient,
only rollout cost. WebSailor V1 therefore leaves out, before RL, the questions the cold-started
policy solves in every rollout (algo.prefilter = solved); V2 also those it never solves
(solved_or_failed), and keeps curating during RL: a question whose group at its latest draw was
all correct (all wrong under solved_or_failed) is retired from later draws (train.rl.pool_refresh).

    pool = QuestionPool(num_tasks)                    # ids 0..n-1: tasks.train.jsonl order
    stats = prefilter_pass(pool, roll, mode, chunk)   # roll(ids, c) -> (len(ids), G) bool verdicts
    ids = pool.draw(seed, step, rnd, count)           # round rnd's slice of the step's permutation
    pool.update(ids, correct, mode)                   # after the step: retire the uninformative ones
    extra["pool"] = pool.state()                      # JSON; QuestionPool.from_state(...) on resume

Draws are a pure function of (seed, step, round, the active ids), and the pool state is two id
lists, saved in the checkpoint manifest: a resumed run draws exactly what the uninterrupted one did.
Within a step, round r (dynamic sampling) takes questions r*count..(r+1)*count-1 of the step's
permutation: fresh questions, never one already drawn in that step; a pool smaller than the step's
rounds gives the last rounds fewer (or no) questions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sailor_engine.rl.dupo import prefilter


def draw_order(seed: int, step: int, n: int) -> list[int]:
    """The permutation of n active questions that step `step` draws from, seeded by (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(n, generator=g).tolist()


class QuestionPool:
    """Task ids (indices into tasks.train.jsonl) still drawable, and why the others are not."""

    def __init__(self, size: int, dropped: Sequence[int] = (), retired: Sequence[int] = ()):
        if size < 1:
            raise ValueError(f"the RL question pool needs at least one task, got {size}")
        self.size = size
        self.dropped = list(dropped)  # by the pre-filter pass, ascending
        self.retired = list(retired)  # during RL, in retirement order
        out = set(self.dropped) | set(self.retired)
        self.active = [i for i in range(size) if i not in out]  # ascending: draws index into it

    def draw(self, seed: int, step: int, rnd: int, count: int) -> list[int]:
        """The ids of round `rnd` of step `step`: slice rnd of the step's permutation of the active ids."""
        order = draw_order(seed, step, len(self.active))[rnd * count:(rnd + 1) * count]
        return [self.active[k] for k in order]

    def drop(self, ids: list[int]) -> None:
        """Remove ids before RL (the pre-filter pass)."""
        gone = set(ids)
        self.dropped = sorted(set(self.dropped) | gone)
        self.active = [i for i in self.active if i not in gone]

    def update(self, ids: list[int], correct: torch.Tensor, mode: str) -> list[int]:
        """Retire the questions among `ids` whose group is uninformative under `mode` (prefilter's rule).

        correct: (len(ids), G) bool, row i = the latest group of ids[i]. Returns the ids retired now.
        """
        if len(ids) != correct.shape[0]:
            raise ValueError(f"update: {len(ids)} ids but {correct.shape[0]} groups")
        keep, _ = prefilter(correct, mode)
        gone = [i for i, k in zip(ids, keep.tolist()) if not k]
        self.retired += gone
        out = set(gone)
        self.active = [i for i in self.active if i not in out]
        return gone

    def state(self) -> dict:
        return {"size": self.size, "dropped": list(self.dropped), "retired": list(self.retired)}

    @classmethod
    def from_state(cls, state: dict) -> QuestionPool:
        return cls(int(state["size"]), [int(i) for i in state["dropped"]], [int(i) for i in state["retired"]])


def prefilter_pass(pool: QuestionPool, roll: Callable[[list[int], int], torch.Tensor], mode: str, chunk: int,
                   limit: int | None = None) -> dict[str, int]:
    """Roll out the first `limit` active questions (None: all) in chunks and drop those `mode` rejects.

    roll(ids, c) returns the (len(ids), G) bool verdicts of chunk c's rollouts. Questions past
    `limit` stay in the pool unfiltered (curation during RL still retires them). Returns
    rl.dupo.prefilter's counts (questions, kept, solved, failed) plus dropped and the pool size after.
    """
    ids = pool.active[:limit]
    parts = [roll(ids[lo:lo + chunk], c) for c, lo in enumerate(range(0, len(ids), chunk))]
    keep, stats = prefilter(torch.cat(parts), mode)
    pool.drop([i for i, k in zip(ids, keep.tolist()) if not k])
    return dict(stats, dropped=stats["questions"] - stats["kept"], active=len(pool.active))
