"""decode_attention (slab-cache one-token attention) against a float64 per-row reference.

Both paths (the Triton kernels, under TRITON_INTERPRET=1 on CPU, and the PyTorch path) run in the
working dtype and pass if their error against float64 is at most 2x that of the same-dtype reference
(kernels/reference.py) plus a small floor. Cache positions a row does not see hold NaN, so a kernel
that reads past a row's end, or mixes rows, fails.
"""

import pytest
import torch

from sailor_engine.kernels.decode_attention import decode_attention, default_splits
from sailor_engine.kernels.reference import decode_attention_reference

TOLERANCES = [
    pytest.param(torch.float32, 1e-6, 1e-6, id="fp32"),
    pytest.param(torch.bfloat16, 1e-3, 1e-2, id="bf16"),
]
IMPLS = ["triton", "torch"]


def _problem(B, H, KVH, D, S, CAP, nvis, *, seed=0, slots=None, peaked=1.0):
    """float64 q (B, H, D), caches (S, KVH, D, CAP) / (S, KVH, CAP, D) with NaN past every row's length."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=gen, dtype=torch.float64) * peaked
    k = torch.randn(S, KVH, D, CAP, generator=gen, dtype=torch.float64)
    v = torch.randn(S, KVH, CAP, D, generator=gen, dtype=torch.float64)
    slots = torch.randperm(S, generator=gen)[:B] if slots is None else torch.as_tensor(slots)
    nvis = torch.as_tensor(nvis, dtype=torch.int64).expand(B).clone()
    for b in range(B):  # keys a row does not see are poison
        k[slots[b], :, :, nvis[b]:] = float("nan")
        v[slots[b], :, nvis[b]:] = float("nan")
    return q, k, v, slots.long(), nvis


def _check(q, k, v, slots, nvis, dtype, atol, rtol, impl, **kw):
    truth = decode_attention_reference(q, k, v, slots, nvis)
    ref = decode_attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), slots, nvis).double()
    out = decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), slots, nvis, impl=impl, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    out = out.double()
    assert torch.isfinite(out).all()
    floor = atol + rtol * truth.abs().max().item()
    err, ref_err = (out - truth).abs().max().item(), (ref - truth).abs().max().item()
    assert err <= 2 * ref_err + floor, f"{impl} {dtype}: err {err:.3g} vs same-dtype reference {ref_err:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("H,KVH,D", [(4, 4, 16), (4, 2, 16), (6, 1, 24), (10, 2, 32), (2, 2, 64)],
                         ids=["mha", "gqa2", "mqa-d24", "g5-d32", "d64"])
def test_matches_reference(impl, dtype, atol, rtol, H, KVH, D):
    # rows of lengths 1, one tile, a tile + 1, and the whole capacity; splits of one and three programs
    q, k, v, slots, nvis = _problem(4, H, KVH, D, S=6, CAP=40, nvis=[1, 16, 17, 40])
    for splits in (1, 3):
        _check(q, k, v, slots, nvis, dtype, atol, rtol, impl, num_splits=splits)


@pytest.mark.parametrize("impl", IMPLS)
def test_peaked_scores_and_custom_scale(impl):
    # large scores: the online max must rescale without overflow; a scale other than 1/sqrt(D)
    q, k, v, slots, nvis = _problem(3, 4, 2, 16, S=3, CAP=50, nvis=[5, 33, 50], peaked=30.0, seed=1)
    truth = decode_attention_reference(q, k, v, slots, nvis, scale=0.7)
    out = decode_attention(q.float(), k.float(), v.float(), slots, nvis, scale=0.7, impl=impl, num_splits=4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=1e-5)


def test_splits_merge_exactly_and_rows_are_independent():
    # the same row gives (nearly) the same result whatever its batch and split count; a slot may repeat
    q, k, v, slots, nvis = _problem(3, 4, 2, 16, S=4, CAP=48, nvis=[7, 48, 30], seed=2)
    q, k, v = q.float(), k.float(), v.float()
    full = decode_attention(q, k, v, slots, nvis, impl="triton", num_splits=1)
    for splits in (2, 3, 5):
        torch.testing.assert_close(decode_attention(q, k, v, slots, nvis, impl="triton", num_splits=splits), full,
                                   atol=2e-6, rtol=2e-6)
    alone = decode_attention(q[1:2], k, v, slots[1:2], nvis[1:2], impl="triton", num_splits=1)
    assert torch.equal(alone[0], full[1])  # one program per (row, kv head): a row does not see its batch
    twice = decode_attention(q[[1, 1]], k, v, slots[[1, 1]], nvis[[1, 1]], impl="triton", num_splits=1)
    assert torch.equal(twice[0], full[1]) and torch.equal(twice[1], full[1])


def test_mixed_dtypes_attend_in_fp32():
    # bf16 queries (autocast) over an fp32 cache: the cache is not rounded to bf16
    q, k, v, slots, nvis = _problem(2, 4, 2, 16, S=2, CAP=20, nvis=[9, 20], seed=3)
    truth = decode_attention_reference(q.bfloat16().double(), k.float().double(), v.float().double(), slots, nvis)
    out = decode_attention(q.bfloat16(), k.float(), v.float(), slots, nvis, impl="triton", num_splits=2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), truth, atol=0, rtol=0.01)  # bf16 output rounding only


def test_length_past_capacity_is_clamped():
    q, k, v, slots, _ = _problem(2, 2, 2, 16, S=2, CAP=20, nvis=[20, 20], seed=4)
    over = torch.tensor([25, 1000])
    out = decode_attention(q.float(), k.float(), v.float(), slots, over, impl="triton")
    truth = decode_attention_reference(q, k, v, slots, torch.tensor([20, 20]))
    torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=1e-5)


def test_default_splits_depend_on_shapes_only():
    cpu = torch.device("cpu")
    assert default_splits(8, 2, 1024, cpu) == 2 and default_splits(8, 2, 16, cpu) == 1


@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.zeros(2, 4)), "q must be"),
    (dict(k=torch.zeros(3, 2, 8, 20)), "do not match"),
    (dict(k=torch.zeros(3, 3, 16, 20), v=torch.zeros(3, 3, 20, 16)), "not a multiple"),
    (dict(slots=torch.zeros(2, dtype=torch.int32)), "slots must be int64"),
    (dict(nvis=torch.zeros(3, dtype=torch.int64)), "nvis must be int64"),
    (dict(k=torch.zeros(3, 2, 20, 16).transpose(-1, -2)), "unit-stride"),
    (dict(impl="cuda"), "impl must be"),
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(q=torch.zeros(2, 4, 16), k=torch.zeros(3, 2, 16, 20), v=torch.zeros(3, 2, 20, 16),
                slots=torch.zeros(2, dtype=torch.int64), nvis=torch.ones(2, dtype=torch.int64), impl="triton")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        decode_attention(args["q"], args["k"], args["v"], args["slots"], args["nvis"], impl=args["impl"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
def test_cuda_compiled_kernel(dtype, atol, rtol):
    # compiled (not interpreted) on a GPU: a 4k-capacity cache, default splits, GQA
    q, k, v, slots, nvis = _problem(8, 16, 4, 128, S=10, CAP=4096, nvis=[1, 63, 64, 65, 1000, 2049, 4000, 4096])
    cuda = [t.cuda() for t in (q, k, v, slots, nvis)]
    _check(*cuda, dtype, atol, rtol, "triton")
    _check(*cuda, dtype, atol, rtol, "triton", num_splits=1)
