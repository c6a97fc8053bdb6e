"""DUPO batch construction, dynamic sampling, pre-filter and V2 exclusion: properties and exact cases."""

import logging
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sailor_engine.rl.advantages import compute_advantages
from sailor_engine.rl.config import AlgoConfig
from sailor_engine.rl.dupo import (DynamicSampler, build_batch, dupo_select, finalize, informative_groups,
                                   prefilter)


def v1_rewards(correct, fmt):
    """WebSailor V1 reward, written out: 0.1 * format + 0.9 * answer."""
    return 0.1 * fmt.double() + 0.9 * correct.double()


def _mats(draw, q, g):
    bits = st.lists(st.lists(st.booleans(), min_size=g, max_size=g), min_size=q, max_size=q)
    return torch.tensor(draw(bits)), torch.tensor(draw(bits))


@st.composite
def batches(draw):
    q, g = draw(st.integers(1, 12)), draw(st.integers(2, 8))
    correct, fmt = _mats(draw, q, g)
    criterion = draw(st.sampled_from(["correctness", "reward_std"]))
    return correct, v1_rewards(correct, fmt), criterion, draw(st.integers(0, 2**31))


def _brute_informative(correct, rewards, criterion):
    out = []
    for c, r in zip(correct.tolist(), rewards.tolist()):
        out.append(0 < sum(c) < len(c) if criterion == "correctness" else len(set(r)) > 1)
    return out


@settings(max_examples=200, deadline=None)
@given(b=batches())
def test_dupo_batch_properties(b):
    correct, rewards, criterion, seed = b
    info = _brute_informative(correct, rewards, criterion)
    assert informative_groups(rewards, correct, criterion).tolist() == info
    out = dupo_select(rewards, correct, torch.Generator().manual_seed(seed), criterion=criterion)
    if not any(info):
        assert out.skip_reason and len(out.index) == 0
        return
    idx = out.index.tolist()
    assert out.skip_reason is None
    assert len(idx) == len(info)                                  # always full
    assert all(info[i] for i in idx)                              # no zero-variance group; copies of informative
    originals = [i for i, d in zip(idx, out.duplicate.tolist()) if not d]
    assert originals == [i for i, ok in enumerate(info) if ok]    # every informative group kept once, in order
    counts = Counter(i for i, d in zip(idx, out.duplicate.tolist()) if d)
    copies = [counts.get(i, 0) for i in originals]
    assert max(copies) - min(copies) <= 1                         # copies spread evenly
    assert out.stats["duplicated"] == len(info) - sum(info) and out.stats["kept"] == sum(info)
    again = dupo_select(rewards, correct, torch.Generator().manual_seed(seed), criterion=criterion)
    assert torch.equal(again.index, out.index) and torch.equal(again.duplicate, out.duplicate)  # seeded


def test_duplication_is_uniform_over_informative_groups():
    # 3 informative groups share 7 free slots: over many seeds each is copied 7/3 times per batch on average.
    correct = torch.tensor([[1, 0]] * 3 + [[1, 1]] * 4 + [[0, 0]] * 3).bool()
    rewards = correct.double()
    totals = Counter()
    for seed in range(300):
        out = dupo_select(rewards, correct, torch.Generator().manual_seed(seed))
        totals.update(out.index[out.duplicate].tolist())
    assert set(totals) == {0, 1, 2}
    for n in totals.values():
        assert abs(n / 300 - 7 / 3) < 0.15


def test_seed_changes_choice_and_generator_advances():
    correct = torch.tensor([[1, 0]] * 4 + [[1, 1]] * 12).bool()
    g = torch.Generator().manual_seed(0)
    a, b = dupo_select(correct.double(), correct, g), dupo_select(correct.double(), correct, g)
    assert not torch.equal(a.index, b.index)


def test_skip_is_logged_with_reason(caplog):
    correct = torch.tensor([[1, 1, 1], [0, 0, 0], [0, 0, 0]]).bool()
    with caplog.at_level(logging.WARNING, logger="sailor_engine.rl.dupo"):
        out = build_batch(correct.double(), correct, None, AlgoConfig(), torch.Generator())
    assert out.skip_reason == "no informative group among 3: 1 all correct, 2 all wrong, 0 other zero-variance"
    assert "skipping RL step" in caplog.text and out.advantages.shape == (0, 3)


def test_criterion_reward_std_keeps_all_wrong_group_with_format_variance():
    correct = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).bool()
    fmt = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]).bool()
    r = v1_rewards(correct, fmt)
    assert informative_groups(r, correct, "correctness").tolist() == [False, False, True]
    assert informative_groups(r, correct, "reward_std").tolist() == [True, False, True]
    with pytest.raises(ValueError, match="zero_variance criterion"):
        informative_groups(r, correct, "std")


def test_build_batch_gathers_advantages_of_source_groups():
    correct = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 1, 1], [0, 0, 0]]).bool()
    r = v1_rewards(correct, torch.ones_like(correct))
    out = build_batch(r, correct, None, AlgoConfig(), torch.Generator().manual_seed(3))
    full = compute_advantages(r, "grpo")
    assert len(out.index) == 4 and set(out.index.tolist()) == {0, 2}
    torch.testing.assert_close(out.advantages, full[out.index], rtol=0, atol=0)
    assert out.seq_keep.all() and out.stats["excluded_truncated"] == 0


def test_v2_excludes_truncated_negatives_but_keeps_them_in_the_baseline():
    cfg = AlgoConfig(preset="sailor_v2")
    correct = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1]]).bool()
    truncated = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0], [1, 0, 1, 0]]).bool()  # [2][0] truncated yet correct
    out = build_batch(correct.double(), correct, truncated, cfg, torch.Generator())
    assert out.index.tolist() == [0, 1, 2] and not out.duplicate.any()        # V2: no selection
    expected_keep = [[c or not t for c, t in zip(cr, tr)] for cr, tr in zip(correct.tolist(), truncated.tolist())]
    assert out.seq_keep.tolist() == expected_keep
    assert out.stats["excluded_truncated"] == 5 and out.stats["zero_variance"] == 1
    # Leave-one-out on the full groups: exclusion does not change anybody's baseline.
    torch.testing.assert_close(out.advantages, compute_advantages(correct.double(), "leave_one_out"))
    with pytest.raises(ValueError, match="truncated is required"):
        build_batch(correct.double(), correct, None, cfg, torch.Generator())


def test_prefilter_modes():
    correct = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0], [1, 1, 1]]).bool()
    assert prefilter(correct, "none")[0].tolist() == [True] * 4
    keep, stats = prefilter(correct, "solved")
    assert keep.tolist() == [False, True, True, False] and stats == dict(questions=4, kept=2, solved=2, failed=1)
    assert prefilter(correct, "solved_or_failed")[0].tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="prefilter mode"):
        prefilter(correct, "all")


def test_dynamic_sampler_fills_from_rounds_and_discards_surplus():
    s = DynamicSampler(3, max_rounds=5)
    rounds = [torch.tensor([[1, 1], [1, 0]]).bool(), torch.tensor([[0, 0], [0, 0], [0, 0]]).bool(),
              torch.tensor([[0, 1], [1, 1], [1, 0], [0, 1]]).bool()]
    for c in rounds:
        assert not s.done
        s.add(c.double(), c)
    assert s.done
    out = s.result()
    # informative groups in the concatenation: 1 (round 0), 5 and 7 (round 2); 8 is surplus.
    assert out.index.tolist() == [1, 5, 7] and out.skip_reason is None
    assert out.stats["surplus"] == 1 and out.stats["rounds"] == 3 and out.stats["partial"] == 0
    with pytest.raises(RuntimeError, match="after done"):
        s.add(rounds[0].double(), rounds[0])
    cat = torch.cat(rounds)
    batch = finalize(cat.double(), cat, None, out, AlgoConfig(preset="custom", dynamic_sampling=True))
    torch.testing.assert_close(batch.advantages, compute_advantages(cat.double(), "grpo")[[1, 5, 7]])


def test_dynamic_sampler_partial_and_empty():
    c = torch.tensor([[1, 1], [1, 0]]).bool()
    s = DynamicSampler(4, max_rounds=2)
    s.add(c.double(), c)
    s.add(c.double(), c)
    out = s.result()
    assert s.done and out.index.tolist() == [1, 3] and out.stats["partial"] == 1
    s = DynamicSampler(2, max_rounds=1)
    s.add(c[:1].double(), c[:1])
    assert s.result().skip_reason.startswith("dynamic sampling found no informative group in 1 round(s)")
    with pytest.raises(ValueError, match="use DynamicSampler"):
        build_batch(c.double(), c, None, AlgoConfig(preset="custom", dynamic_sampling=True), torch.Generator())


def test_shape_errors_name_the_field():
    c = torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="rewards must have the shape"):
        informative_groups(torch.zeros(3, 5), c)
    with pytest.raises(ValueError, match="correct must be a"):
        informative_groups(torch.zeros(3, 4), c.float())


def test_v2_skips_only_when_no_group_is_informative():
    cfg = AlgoConfig(preset="sailor_v2")
    solved = torch.ones(2, 4, dtype=torch.bool)
    out = build_batch(solved.double(), solved, torch.zeros_like(solved), cfg, torch.Generator())
    assert out.skip_reason == "no informative group among 2: 2 all correct, 0 all wrong, 0 other zero-variance"
    mixed = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]).bool()
    out = build_batch(mixed.double(), mixed, torch.zeros_like(mixed), cfg, torch.Generator())
    assert out.skip_reason is None and out.index.tolist() == [0, 1] and (out.advantages[0] == 0).all()
