"""Warmup + cosine schedule against a brute-force restatement: the lr of every step as the fraction of
the warmup done, then the cosine of the angle covered so far over the remaining steps."""

import math

import pytest

from sailor_engine.train.schedule import lr_at


def brute(step, peak, warmup, total, ratio, schedule):
    if step < warmup:
        return peak * sum(1 for _ in range(step + 1)) / warmup
    if schedule == "constant":
        return peak
    decay_steps = list(range(warmup, total))
    angle = math.pi * decay_steps.index(step) / len(decay_steps)
    return peak * ratio + (peak - peak * ratio) * (1 + math.cos(angle)) / 2


@pytest.mark.parametrize("warmup,total,ratio,schedule", [(0, 1, 0.1, "cosine"), (3, 10, 0.1, "cosine"),
                                                         (5, 5, 0.0, "cosine"), (2, 7, 0.5, "constant"),
                                                         (0, 123, 0.0, "cosine")])
def test_matches_brute_force(warmup, total, ratio, schedule):
    for s in range(total):
        got = lr_at(s, peak=3e-4, warmup_steps=warmup, total_steps=total, min_lr_ratio=ratio, schedule=schedule)
        assert got == pytest.approx(brute(s, 3e-4, warmup, total, ratio, schedule), rel=1e-12, abs=0), s


def test_shape_of_the_curve():
    lrs = [lr_at(s, peak=1.0, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert 0.1 < lrs[-1] < 0.11


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="step 10 outside the schedule's 10 steps"):
        lr_at(10, peak=1.0, warmup_steps=0, total_steps=10)
    with pytest.raises(ValueError, match="schedule must be 'cosine' or 'constant', got 'linear'"):
        lr_at(0, peak=1.0, warmup_steps=0, total_steps=10, schedule="linear")
