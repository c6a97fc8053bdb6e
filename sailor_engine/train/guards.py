"""Non-finite guard of the training loops: skip an optimizer step whose loss or gradient norm is NaN or
inf, and stop the run after train.max_nonfinite_steps such steps in a row.

    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, last_checkpoint)
    reason = guard.check(loss, grad_norm)   # None, "non-finite loss" or "non-finite grad_norm"
    if reason: opt.zero_grad() (no opt.step) ... write the metrics row with "skipped": reason
    guard.stop_if_exhausted(step)           # TrainingStopped after the limit, the row written first
    guard.saved(path)                       # after every checkpoint: the one the message names

Why skip and not stop at once: one bad batch (an overflow, a corrupt sample) should not end a long
run, and AdamW would otherwise write the NaN into both moments, after which every later step is NaN
too. A skipped step leaves parameters and optimizer state exactly as they were (opt.step is not
called, its step count does not advance); its batch and its slot of the lr schedule are used up,
as the data order and the schedule are functions of the step. Why stop after a few: a persistent
NaN (diverged weights, a broken kernel) only burns compute; the run stops without saving the
state it stopped in and names the last good checkpoint to resume or debug from.

Every rank makes the same decision without communicating: the loss is all-reduced and the grad
norm is global (global_grad_norm), so a NaN on one rank reaches all of them.

`json_row` writes a metrics row as strict JSON: NaN and inf become null (json.dumps would write
NaN, which JSON parsers other than Python's refuse).
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps); the message says where and why."""


class NonFiniteGuard:
    """Counts consecutive non-finite optimizer steps; see the module docstring."""

    def __init__(self, max_steps: int, last_checkpoint: str | Path | None = None):
        if max_steps < 1:
            raise ValueError(f"train.max_nonfinite_steps must be >= 1, got {max_steps}")
        self.max_steps = max_steps
        self.last_checkpoint = None if last_checkpoint is None else Path(last_checkpoint)
        self.streak = 0  # consecutive non-finite steps up to now
        self.reason: str | None = None  # of the latest one

    def check(self, loss: float, grad_norm: float) -> str | None:
        """The reason to skip this step (None: apply it); counts the streak."""
        if not math.isfinite(float(loss)):
            self.reason = "non-finite loss"
        elif not math.isfinite(float(grad_norm)):
            self.reason = "non-finite grad_norm"
        else:
            self.streak, self.reason = 0, None
            return None
        self.streak += 1
        return self.reason

    @property
    def exhausted(self) -> bool:
        return self.streak >= self.max_steps

    def saved(self, path: str | Path) -> None:
        self.last_checkpoint = Path(path)

    def stop_if_exhausted(self, step: int) -> None:
        """Raise TrainingStopped once max_steps steps in a row were non-finite (step: the latest, 1-based)."""
        if not self.exhausted:
            return
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint is not None
                 else "no checkpoint was written by this run")
        raise TrainingStopped(f"step {step}: {self.reason} for {self.streak} consecutive optimizer steps "
                              f"(train.max_nonfinite_steps = {self.max_steps}); stopped without saving, "
                              f"{where}")


def finite_or_none(value):
    """value with every non-finite float (also inside lists and dicts) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def json_row(row: dict) -> str:
    """One metrics.jsonl line: strict JSON, non-finite numbers as null."""
    return json.dumps(finite_or_none(row), allow_nan=False)
