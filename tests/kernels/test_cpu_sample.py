"""The C sampling step (csrc/cpu_sample.c): argmax and log-probs against float64, the inverse-CDF draw
against a float64 brute force and a chi-square test of its law, rows independent of their batch and
the thread count bit for bit, non-finite rows, and bad input."""

import math
import shutil

import pytest
import torch

from sailor_engine.kernels import cpu_sample

if not any(map(shutil.which, ("cc", "gcc", "clang"))):
    pytest.skip("no C compiler on this machine: the kernel cannot be built", allow_module_level=True)

VOCABS = (1, 15, 16, 17, 255, 256, 257, 4096, 5003)


def test_builds_here():
    assert cpu_sample.available(), cpu_sample.status()


def logits(R, V, seed=0, scale=3.0):
    return torch.randn(R, V, generator=torch.Generator().manual_seed(seed)) * scale


def reference(z, temp):
    """float64 log_softmax(z / T) per row, T = 1 where temp is 0 (greedy)."""
    T = torch.where(temp > 0, temp, torch.ones_like(temp)).double()
    return torch.log_softmax(z.double() / T[:, None], -1)


@pytest.mark.parametrize("V", VOCABS)
def test_greedy_is_argmax_with_the_log_softmax(V):
    z = logits(9, V, seed=V)
    z[1] = z[1].max()  # every token tied: the first one
    if V > 20:
        z[2, [3, 17]] = z[2].max() + 1  # a tie of two past the first vector: the first of them
    tokens, logps = cpu_sample.sample(z, torch.zeros(9), torch.zeros(9))
    assert torch.equal(tokens, z.argmax(-1))
    want = reference(z, torch.zeros(9)).gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logps.double(), want, atol=2e-6, rtol=2e-7)


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("T", (1.0, 0.7, 2.3))
def test_draw_is_the_inverse_cdf_at_u(V, T):
    R = 64
    z = logits(R, V, seed=V + 1)
    temp = torch.full((R,), T)
    u = torch.rand(R, generator=torch.Generator().manual_seed(3))
    u[:2] = torch.tensor([0.0, 1 - 2**-24])  # the ends of [0, 1)
    tokens, logps = cpu_sample.sample(z, temp, u)
    ref = reference(z, temp)
    cdf = ref.exp().cumsum(-1)
    target = u.double() * cdf[:, -1]
    want = torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_(max=V - 1)
    # the draw equals the float64 one except where u s lies within rounding (float32 exps and block
    # sums) of a CDF step, which leaves most rows to compare
    near = (cdf - target[:, None]).abs().min(-1).values < 1e-6 * cdf[:, -1]
    assert torch.equal(tokens[~near], want[~near])
    assert tokens[0] == 0 and near[2:].sum() <= 3  # u = 0 draws the first token (every one has p > 0 here)
    torch.testing.assert_close(logps.double(), ref.gather(-1, tokens[:, None])[:, 0], atol=2e-6, rtol=2e-7)


def test_sampling_law_chi_square():
    """40k draws from one row: the frequencies of softmax(z / T), by a chi-square test."""
    V, T, n = 12, 0.7, 40000
    z = logits(1, V, seed=5, scale=1.5).expand(n, V)
    u = torch.rand(n, generator=torch.Generator().manual_seed(6))
    tokens, _ = cpu_sample.sample(z, torch.full((n,), T), u)
    p = torch.softmax(z[0].double() / T, -1)
    counts = torch.bincount(tokens, minlength=V).double()
    chi2 = ((counts - p * n) ** 2 / (p * n)).sum().item()
    df = V - 1
    crit = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3  # ~0.999 quantile (Wilson-Hilferty)
    assert chi2 < crit, (chi2, crit)


def test_masked_and_negligible_tokens_are_never_drawn():
    """-inf logits and tokens whose exp underflows (peaked rows) have probability 0: never drawn, for any u."""
    V, R = 300, 2000
    z = logits(1, V, seed=7).expand(R, V).clone()
    z[:, ::3] = -math.inf
    z[:, 5] = 200.0  # exp(y - max) < 1e-38 for every other token...
    z[:, 260] = 199.0  # ...but this one (block 2)
    u = torch.rand(R, generator=torch.Generator().manual_seed(8))
    u[0], u[1] = 0.0, 1 - 2**-24
    tokens, logps = cpu_sample.sample(z, torch.ones(R), u)
    assert set(tokens.tolist()) == {5, 260}
    assert tokens[0] == 5 and tokens[1] == 260
    p260 = 1 / (1 + math.e)
    assert abs((tokens == 260).double().mean().item() - p260) < 0.04
    torch.testing.assert_close(logps[tokens == 260].double(), torch.tensor(math.log(p260), dtype=torch.float64).expand(
        int((tokens == 260).sum())), atol=1e-6, rtol=0)


def test_a_row_does_not_depend_on_its_batch_or_the_thread_count():
    R, V = 48, 4096
    z = logits(R, V, seed=9)
    temp = torch.tensor([0.0, 1.0, 0.7, 1.3] * (R // 4))
    u = torch.rand(R, generator=torch.Generator().manual_seed(10))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_sample.sample(z, temp, u)
        torch.set_num_threads(3)
        three = cpu_sample.sample(z, temp, u)
    finally:
        torch.set_num_threads(n)
    wide = torch.full((R, V + 40), -5.0)
    wide[:, 7 : V + 7] = z  # rows V + 40 apart: the strided view is read in place
    strided = cpu_sample.sample(wide[:, 7 : V + 7], temp, u)
    alone = [cpu_sample.sample(z[i : i + 1], temp[i : i + 1], u[i : i + 1]) for i in range(R)]
    # a single row whose stride(0) says nothing (1, from a transpose: the TP generator's logits)
    row = torch.empty(V, 1).copy_(z[5, :, None]).t()
    assert row.stride() == (1, 1)
    single = cpu_sample.sample(row, temp[5:6], u[5:6])
    assert single[0] == one[0][5] and single[1] == one[1][5]
    for got in (three, strided):
        assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1])
    assert torch.equal(torch.cat([a[0] for a in alone]), one[0])
    assert torch.equal(torch.cat([a[1] for a in alone]), one[1])


def test_rows_without_a_finite_maximum_get_nan():
    z = logits(4, 40, seed=11)
    z[0, 21], z[0, 30] = math.nan, math.inf
    z[1, 33] = math.inf
    z[2] = -math.inf
    tokens, logps = cpu_sample.sample(z, torch.tensor([0.0, 1.0, 0.5, 1.0]), torch.full((4,), 0.5))
    assert tokens[:3].tolist() == [21, 33, 0]
    assert logps[:3].isnan().all() and logps[3].isfinite()


def test_bad_input():
    z = logits(3, 20)
    with pytest.raises(ValueError, match="row 1: temp -1"):
        cpu_sample.sample(z, torch.tensor([0.0, -1.0, 1.0]), torch.zeros(3))
    with pytest.raises(ValueError, match="row 2: temp nan"):
        cpu_sample.sample(z, torch.tensor([0.0, 1.0, math.nan]), torch.zeros(3))
    with pytest.raises(ValueError, match=r"row 0: .* u 1.0 in \[0, 1\)"):
        cpu_sample.sample(z, torch.ones(3), torch.tensor([1.0, 0.0, 0.0]))
    cpu_sample.sample(z, torch.zeros(3), torch.full((3,), 7.0))  # u is not read on greedy rows
    with pytest.raises(ValueError, match="float32"):
        cpu_sample.sample(z.double(), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="non-empty"):
        cpu_sample.sample(torch.zeros(3, 0), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"temp and u must be \(3,\)"):
        cpu_sample.sample(z, torch.zeros(2), torch.zeros(3))
