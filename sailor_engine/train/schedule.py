"""Learning-rate schedule: linear warmup, then cosine decay to lr * min_lr_ratio (or constant).

    lr = lr_at(step, peak=5e-6, warmup_steps=10, total_steps=200, min_lr_ratio=0.1)   # step: 0-based
    for g in optimizer.param_groups: g["lr"] = lr

A pure function of the optimizer step, so a resumed run needs nothing but the step to continue the
same schedule. Step s (0-based) of warmup trains at peak * (s + 1) / warmup_steps, so the first step
already moves the weights and the last warmup step is at the peak; the cosine then runs over the
remaining total_steps - warmup_steps steps, from the peak (its first step) down to
peak * min_lr_ratio (reached by the step after the last, so the last step is just above it).
"""

from __future__ import annotations

import math


def lr_at(step: int, *, peak: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
          schedule: str = "cosine") -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside the schedule's {total_steps} steps")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return peak * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
