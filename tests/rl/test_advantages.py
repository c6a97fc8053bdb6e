"""Group advantages vs brute-force float64 references written from REFERENCES.md (verl, TRL, V2)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sailor_engine.rl.advantages import compute_advantages, dr_grpo, grpo, leave_one_out


def _brute(rewards, kind, eps=1e-6):
    """One Python loop per element, float64: the conventions as REFERENCES.md states them."""
    out = []
    for row in rewards.tolist():
        g = len(row)
        mean = sum(row) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (g - 1))  # unbiased
        if kind == "grpo":
            out.append([(x - mean) / (std + eps) for x in row])
        elif kind == "loo":  # R_i - mean of the others
            out.append([x - (sum(row) - x) / (g - 1) for x in row])
        else:
            out.append([x - mean for x in row])
    return torch.tensor(out, dtype=torch.float64)


REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0],
                        [0.1, 1.0, 0.1, 0.0, 0.9, 0.1, 1.0, 0.0],
                        [0.25, 0.5, 0.75, 1.0, 0.0, 0.3, 0.6, 0.9]], dtype=torch.float64)


@pytest.mark.parametrize("eps", [1e-6, 1e-4])  # verl's and TRL's epsilon
def test_grpo_matches_verl_and_trl_convention(eps):
    torch.testing.assert_close(grpo(REWARDS, eps), _brute(REWARDS, "grpo", eps), rtol=1e-13, atol=1e-13)


def test_leave_one_out_matches_rloo_and_brute_force():
    got = leave_one_out(REWARDS)
    torch.testing.assert_close(got, _brute(REWARDS, "loo"), rtol=1e-13, atol=1e-13)
    g = REWARDS.shape[1]  # verl's RLOO form: n / (n - 1) * (s - mean)
    torch.testing.assert_close(got, g / (g - 1) * (REWARDS - REWARDS.mean(1, keepdim=True)), rtol=1e-13, atol=1e-13)


def test_dr_grpo_and_dispatch():
    torch.testing.assert_close(dr_grpo(REWARDS), _brute(REWARDS, "dr"), rtol=1e-13, atol=1e-13)
    for name, fn in [("grpo", grpo), ("leave_one_out", leave_one_out), ("dr_grpo", dr_grpo)]:
        torch.testing.assert_close(compute_advantages(REWARDS, name), fn(REWARDS))
    with pytest.raises(ValueError, match="advantage estimator"):
        compute_advantages(REWARDS, "ppo")


def test_known_values_and_dtype():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    std = math.sqrt(1 / 3)  # unbiased std of {1, 0, 0, 1}
    assert grpo(r, 0.0)[0].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std])
    assert leave_one_out(r)[0].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    assert grpo(r.half()).dtype == torch.float16 and leave_one_out(r.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("fn", [lambda r: grpo(r, 0.0), grpo, leave_one_out, dr_grpo])
def test_constant_group_gets_exactly_zero(fn):
    r = torch.tensor([[0.1] * 7, [0.3] * 7, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    a = fn(r)
    assert torch.isfinite(a).all() and (a[:2] == 0).all() and (a[2] != 0).all()


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(8), "num_groups, G"), (torch.zeros(3, 1), "G >= 2"),
    (torch.zeros(2, 4, dtype=torch.long), "floating"), (torch.tensor([[0.0, float("nan")]]), "NaN"),
])
def test_bad_input_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        grpo(bad)


rewards_st = st.integers(1, 6).flatmap(lambda q: st.integers(2, 9).flatmap(lambda g: st.lists(
    st.lists(st.sampled_from([0.0, 0.1, 0.9, 1.0]) | st.floats(-5, 5, allow_nan=False), min_size=g, max_size=g),
    min_size=q, max_size=q)))


@settings(max_examples=150, deadline=None)
@given(rows=rewards_st)
def test_group_advantages_have_zero_mean(rows):
    r = torch.tensor(rows, dtype=torch.float64)
    for name in ("grpo", "leave_one_out", "dr_grpo"):
        a = compute_advantages(r, name)
        assert a.shape == r.shape
        assert a.sum(dim=1).abs().max() <= 1e-9 * max(1.0, float(a.abs().max()))
        # Order is preserved: a better rollout never gets a smaller advantage.
        diff_r = r[:, :, None] - r[:, None, :]
        diff_a = a[:, :, None] - a[:, None, :]
        assert not ((diff_r > 0) & (diff_a < 0)).any()
