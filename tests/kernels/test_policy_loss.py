"""policy_loss (Triton under TRITON_INTERPRET=1 on CPU, and the PyTorch path) against float64.

Ground truth: policy_loss_reference run in float64 on the same (dtype-rounded) inputs, with its
gradient from autograd; peer conventions (verl, TRL) re-derived here from REFERENCES.md.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from sailor_engine.kernels.policy_loss import PolicyLossStats, _fp32_to_bf16_rtne, policy_loss
from sailor_engine.kernels.reference import policy_loss_reference

IMPLS = ["torch", "triton"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
STAT_KEYS = ["clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio_mean", "ratio_max", "kl_mean"]


def ours(impl):
    """policy_loss with impl forced; the Triton kernel runs on CUDA when there is one, else under
    the interpreter on CPU. Takes and returns CPU tensors (differentiably)."""
    dev = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    to = lambda t: t.to(dev) if torch.is_tensor(t) else t  # noqa: E731

    def fn(logp, *args, **kw):
        loss, stats = policy_loss(to(logp), *map(to, args), impl=impl, **{k: to(v) for k, v in kw.items()})
        return loss.cpu(), PolicyLossStats(**{k: v.cpu() for k, v in stats.as_dict().items()})

    return fn


def make_inputs(shape, dtype=torch.float32, *, seed=0, per_seq=False, spread=0.3, mask_p=0.7):
    """logp < 0, old_logp = logp + noise (ratios on both sides of the clip range), ref likewise."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=g) * 3 - 0.05
    old = logp + torch.randn(shape, generator=g) * spread
    ref = logp + torch.randn(shape, generator=g) * 0.5
    adv_shape = shape[:-1] + (1,) if per_seq else shape
    adv = torch.randn(adv_shape, generator=g)
    mask = torch.rand(shape, generator=g) < mask_p
    return {"logp": logp.to(dtype), "old_logp": old.to(dtype), "advantages": adv.to(dtype),
            "loss_mask": mask, "ref_logp": ref.to(dtype)}


def run(fn, inputs, grad_weight=None, **kw):
    """(loss, d(sum(loss * w))/d logp, stats dict) of fn (policy_loss or the reference)."""
    logp = inputs["logp"].detach().clone().requires_grad_()
    args = {k: v for k, v in inputs.items() if k != "logp"}
    if "ref_logp" in kw:
        args["ref_logp"] = kw.pop("ref_logp")
    elif kw.get("kl_coef", 0.0) == 0.0 and "kl_estimator" not in kw:
        args.pop("ref_logp")
    loss, stats = fn(logp, **args, **kw)
    w = torch.ones_like(loss) if grad_weight is None else grad_weight.to(loss.dtype)
    (grad,) = torch.autograd.grad((loss * w).sum(), logp)
    stats = stats.as_dict() if isinstance(stats, PolicyLossStats) else stats
    return loss.detach(), grad, stats


def run64(inputs, **kw):
    as64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    kw = {k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}
    return run(policy_loss_reference, as64, **kw)


def err(x, ref):
    """Max error, relative above 1 and absolute below (losses span e^-20 .. e^20)."""
    return ((x.double() - ref).abs() / (1 + ref.abs())).max().item() if ref.numel() else 0.0


def check_vs_float64(inputs, impl, **kw):
    """Kernel and PyTorch path vs float64: error <= 2x the PyTorch path's own + fp32 rounding,
    and the PyTorch path within a few fp32 ulps (both compute in fp32 from the same inputs)."""
    loss64, grad64, stats64 = run64(inputs, **kw)
    loss, grad, stats = run(ours(impl), inputs, **kw)
    loss_t, grad_t, _ = run(ours("torch"), inputs, **kw)
    tiny = 4e-7
    assert loss.dtype == torch.float32 and grad.dtype == inputs["logp"].dtype
    assert err(loss_t, loss64) <= tiny
    assert err(loss, loss64) <= 2 * err(loss_t, loss64) + tiny
    # The gradient is rounded to the input dtype: allow that one rounding.
    gtol = torch.finfo(inputs["logp"].dtype).eps / 2 + tiny
    assert err(grad_t, grad64) <= gtol
    assert err(grad, grad64) <= 2 * err(grad_t, grad64) + tiny
    assert int(stats["num_tokens"]) == int(stats64["num_tokens"])
    for k in STAT_KEYS:
        assert stats[k].item() == pytest.approx(stats64[k].item(), rel=1e-5, abs=1e-6), k
    return loss, grad, stats


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (5,), (123,), (1151,), (3, 41)])
def test_matches_float64(impl, dtype, shape):
    check_vs_float64(make_inputs(shape, dtype, seed=len(shape) * 1000 + shape[-1]), impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_per_sequence_advantages(impl, dtype):
    """(B, 1) and (B,) advantages equal per-token advantages expanded over T."""
    inputs = make_inputs((4, 29), dtype, per_seq=True, seed=3)
    loss, grad, _ = check_vs_float64(inputs, impl, dual_clip=3.0)
    for adv in (inputs["advantages"], inputs["advantages"].squeeze(-1)):
        expanded = dict(inputs, advantages=inputs["advantages"].expand(4, 29).contiguous())
        l2, g2, _ = run(ours(impl), expanded, dual_clip=3.0)
        l1, g1, _ = run(ours(impl), dict(inputs, advantages=adv), dual_clip=3.0)
        assert torch.equal(l1, l2) and torch.equal(g1, g2)


@pytest.mark.parametrize("impl", IMPLS)
def test_many_blocks_and_chunks(impl):
    """21003 tokens: several kernel blocks / PyTorch chunks, sequence boundaries inside them."""
    inputs = make_inputs((3, 7001), torch.bfloat16, per_seq=True, seed=41)
    check_vs_float64(inputs, impl, dual_clip=3.0, kl_coef=0.02)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kl_estimators(impl, estimator, dtype):
    inputs = make_inputs((2, 77), dtype, seed=11)
    check_vs_float64(inputs, impl, kl_coef=0.05, kl_estimator=estimator, dual_clip=2.5)
    # kl_coef = 0 with ref_logp: the KL is reported, the loss is the plain clipped loss.
    loss, _, stats = run(ours(impl), inputs, kl_estimator=estimator)
    plain, _, plain_stats = run(ours(impl), dict(inputs, ref_logp=None))
    assert torch.equal(loss, plain) and stats["kl_mean"] != 0 and plain_stats["kl_mean"] == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_k3_accurate_near_zero_and_clamped(impl):
    """k3 = e^x - 1 - x to fp32 rounding for tiny x (the naive fp32 formula loses every digit
    there), and verl's clamps: x to +-20, k3 to 10 with a zero gradient beyond."""
    x = torch.cat([torch.logspace(-6, 0.5, 40), -torch.logspace(-6, 0.5, 40), torch.tensor([3.0, 12.0, -25.0, 40.0])])
    logp = torch.full_like(x, -2.0)
    inputs = {"logp": logp, "old_logp": logp.clone(), "advantages": torch.zeros_like(x),
              "loss_mask": torch.ones_like(x, dtype=torch.bool), "ref_logp": logp + x}
    loss, grad, _ = run(ours(impl), inputs, kl_coef=1.0)
    loss64, grad64, _ = run64(inputs, kl_coef=1.0)
    assert ((loss.double() - loss64).abs() <= 4e-7 * loss64.abs()).all()
    assert ((grad.double() - grad64).abs() <= 4e-7 * grad64.abs() + 1e-12).all()
    assert loss[-1] == 10.0 and grad[-1] == 0.0 and loss[-2] == 10.0 and grad[-2] == 0.0
    naive = torch.exp(x) - x - 1
    assert (naive.double() - loss64).abs().max() > 1e3 * (loss.double() - loss64).abs().max()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_masked_garbage_is_exactly_zero(impl, dtype):
    """inf / NaN at masked tokens (inputs and grad_out) give exactly 0 loss and 0 gradient, and
    stay out of the stats."""
    inputs = make_inputs((3, 50), dtype, seed=5)
    clean = {k: v.clone() for k, v in inputs.items()}
    m = inputs["loss_mask"]
    junk = torch.tensor([math.nan, math.inf, -math.inf, 1e4], dtype=dtype).repeat(40)[:150].view(3, 50)
    for k in ("logp", "old_logp", "advantages", "ref_logp"):
        inputs[k] = torch.where(m, inputs[k], junk)
    w = torch.where(m, torch.rand(3, 50), torch.tensor(math.nan))
    kw = {"kl_coef": 0.1, "dual_clip": 3.0}
    loss, grad, stats = run(ours(impl), inputs, grad_weight=w, **kw)
    assert (loss[~m] == 0).all() and (grad[~m] == 0).all()
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    loss_c, grad_c, stats_c = run(ours(impl), clean,
                                  grad_weight=torch.where(m, w, 0.0), **kw)
    assert torch.equal(loss, loss_c) and torch.equal(grad, grad_c)
    assert all(torch.equal(stats[k], stats_c[k]) for k in stats)
    # The reference masks the same way (its autograd gradient is also exactly 0 there).
    loss64, grad64, _ = run64(inputs, grad_weight=torch.where(m, w, 0.0), **kw)
    assert (grad64[~m] == 0).all() and torch.isfinite(loss64).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_unmasked_nan_stays_loud(impl):
    inputs = make_inputs((2, 9), seed=7, mask_p=1.0)
    inputs["logp"][0, 3] = math.nan
    inputs["old_logp"][1, 4] = math.nan
    loss, grad, _ = run(ours(impl), inputs, kl_coef=0.1)
    for idx in ((0, 3), (1, 4)):
        assert loss[idx].isnan() and grad[idx].isnan()
    assert torch.isfinite(loss).sum() == 16 and torch.isfinite(grad).sum() == 16


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_and_batch(impl):
    inputs = make_inputs((4, 33), torch.bfloat16, seed=9)
    inputs["loss_mask"][1] = False
    inputs["loss_mask"][3] = False
    loss, grad, _ = check_vs_float64(inputs, impl, kl_coef=0.1)
    assert (loss[1] == 0).all() and (grad[1] == 0).all() and (loss[3] == 0).all()
    inputs["loss_mask"][:] = False
    loss, grad, stats = run(ours(impl), inputs, kl_coef=0.1)
    assert (loss == 0).all() and (grad == 0).all()
    assert int(stats["num_tokens"]) == 0 and all(stats[k].item() == 0 for k in STAT_KEYS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_extreme_log_ratios(impl, dtype):
    """|logp - old| > 20: the ratio saturates at e^+-20 and its gradient is zero."""
    inputs = make_inputs((2, 64), dtype, seed=13, mask_p=0.9)
    d = torch.tensor([25.0, -25.0, 60.0, -90.0, 19.5, -19.5, 0.0, 21.0]).repeat(16).view(2, 64)
    inputs["old_logp"] = (inputs["logp"].float() - d).to(dtype)
    loss, grad, stats = check_vs_float64(inputs, impl, dual_clip=3.0)
    loss64, grad64, stats64 = run64(inputs, dual_clip=3.0)
    assert torch.allclose(loss.double(), loss64, rtol=2e-6, atol=0)
    assert stats["ratio_max"].item() == pytest.approx(math.exp(20), rel=1e-6)
    far = (inputs["logp"].double() - inputs["old_logp"].double()).abs() > 20
    assert (grad[far] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_advantage(impl):
    inputs = make_inputs((3, 21), torch.float32, seed=17)
    inputs["advantages"] = torch.zeros(3, 1)
    loss, grad, stats = run(ours(impl), inputs, dual_clip=3.0)
    assert (loss == 0).all() and (grad == 0).all()
    assert stats["clip_frac_low"] == 0 and stats["clip_frac_high"] == 0 and stats["dual_clip_frac"] == 0


def verl_style(logp, old, adv, mask, ref, *, eps_low, eps_high, c, kl):
    """verl's conventions as REFERENCES.md describes them (naive formulas, float64)."""
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    clip1 = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
    pg = torch.where(adv < 0, torch.minimum(-adv * c, clip1), clip1)
    if kl == "k1":
        kld = logp - ref
    elif kl == "k2":
        kld = 0.5 * (logp - ref).square()
    else:
        x = torch.clamp(ref - logp, -20.0, 20.0)
        kld = torch.clamp(torch.exp(x) - x - 1, -10.0, 10.0)
    return pg * mask, kld * mask


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_verl_convention(kl):
    """float64: forward bitwise equal to verl's clip / dual clip, KL to 1e-12 (series vs naive)."""
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in make_inputs((4, 60), seed=21).items()}
    # Row 0 starts with one token per case: dual clip (x2), clip high (x2), clip low, unclipped.
    inputs["old_logp"][0, :8] = inputs["logp"][0, :8] - torch.tensor([30.0, 3, 1.5, -1.2, -2, 2, 0, 0.1])
    inputs["advantages"][0, :8] = torch.tensor([-1.0, -1.5, 1, -1, 1, 2, 0.5, -0.5])
    inputs["loss_mask"][0, :8] = True
    pg, kld = verl_style(inputs["logp"], inputs["old_logp"], inputs["advantages"], inputs["loss_mask"],
                         inputs["ref_logp"], eps_low=0.2, eps_high=0.28, c=3.0, kl=kl)
    loss, _, stats = run(ours("torch"), inputs, dual_clip=3.0, kl_estimator=kl)
    assert loss.dtype == torch.float64 and torch.equal(loss, pg)
    assert stats["dual_clip_frac"] > 0 and stats["clip_frac_low"] > 0 and stats["clip_frac_high"] > 0
    with_kl, _, stats = run(ours("torch"), inputs, dual_clip=3.0,
                            kl_coef=0.3, kl_estimator=kl)
    torch.testing.assert_close(with_kl, pg + 0.3 * kld, rtol=1e-12, atol=1e-13)
    m = inputs["loss_mask"]
    assert stats["kl_mean"].item() == pytest.approx((kld.sum() / m.sum()).item(), rel=1e-12)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("impl", IMPLS)
def test_trl_convention(impl):
    """TRL: no ratio clamp (log_ratio_clamp=inf), L = -min(coef A, clamp(coef) A) + beta k3;
    equal where finite (exp overflows fp32 past a log-ratio of ~88)."""
    inputs = make_inputs((2, 48), seed=23, spread=1.0, mask_p=1.0)
    d = torch.tensor([30.0, -30.0, 60.0, 95.0, -120.0, 5.0]).repeat(16).view(2, 48)
    inputs["old_logp"] = inputs["logp"] - d
    beta, eh = 0.04, 0.28
    loss, _, _ = run(ours(impl), inputs, log_ratio_clamp=math.inf,
                     kl_coef=beta, eps_low=0.2, eps_high=eh)
    x = (inputs["ref_logp"] - inputs["logp"]).double()
    coef = torch.exp((inputs["logp"] - inputs["old_logp"]).double())
    a = inputs["advantages"].double()
    trl = -torch.minimum(coef * a, torch.clamp(coef, 0.8, 1 + eh) * a) + beta * (torch.exp(x) - x - 1)
    finite = torch.isfinite(trl) & torch.isfinite(loss)
    assert finite.sum() > 80 and not torch.isfinite(loss).all()  # overflow cases are present
    torch.testing.assert_close(loss.double()[finite], trl[finite], rtol=2e-6, atol=1e-6)


def test_gradcheck_float64_torch_path():
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in make_inputs((3, 11), seed=29).items()}
    for kw in ({"dual_clip": 2.0, "kl_coef": 0.2, "kl_estimator": "k3"}, {"kl_coef": 0.5, "kl_estimator": "k2"},
               {"kl_coef": 0.1, "kl_estimator": "k1", "log_ratio_clamp": 0.5}):
        def f(logp, kw=kw):
            return policy_loss(logp, inputs["old_logp"], inputs["advantages"], inputs["loss_mask"],
                               ref_logp=inputs["ref_logp"], impl="torch", **kw)[0]

        assert torch.autograd.gradcheck(f, (inputs["logp"].clone().requires_grad_(),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_dtypes_noncontiguous_and_no_grad(impl):
    inputs = make_inputs((5, 31), seed=31)
    ref_loss, ref_grad, _ = run(ours(impl), inputs)
    for mask in (inputs["loss_mask"].to(torch.int32), inputs["loss_mask"].float()):
        loss, grad, _ = run(ours(impl), dict(inputs, loss_mask=mask))
        assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
    transposed = {k: v.t().contiguous().t() for k, v in inputs.items()}  # same values, column-major
    loss, grad, _ = run(ours(impl), transposed)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
    with torch.no_grad():
        loss, _ = ours(impl)(inputs["logp"], inputs["old_logp"], inputs["advantages"], inputs["loss_mask"])
    assert torch.equal(loss, ref_loss) and not loss.requires_grad


def test_empty_and_dispatch():
    x = torch.empty(0)
    loss, stats = ours("triton")(x, x, x, x.bool())
    assert loss.shape == (0,) and int(stats.num_tokens) == 0 and stats.ratio_max == 0
    inputs = make_inputs((7,), torch.float64)
    with pytest.raises(ValueError, match="float64"):
        policy_loss(inputs["logp"], inputs["old_logp"], inputs["advantages"], inputs["loss_mask"], impl="triton")
    loss, _ = policy_loss(inputs["logp"], inputs["old_logp"], inputs["advantages"], inputs["loss_mask"])
    assert loss.dtype == torch.float64


def _bad(**over):
    inputs = make_inputs((2, 5))
    args = {"logp": inputs["logp"], "old_logp": inputs["old_logp"], "advantages": inputs["advantages"],
            "loss_mask": inputs["loss_mask"]}
    args.update(over)
    return args


@pytest.mark.parametrize("over, match", [
    ({"old_logp": torch.zeros(2, 4)}, "old_logp has shape"),
    ({"loss_mask": torch.ones(10, dtype=torch.bool)}, "loss_mask has shape"),
    ({"advantages": torch.zeros(5)}, "advantages has shape"),
    ({"ref_logp": torch.zeros(5, 2)}, "ref_logp has shape"),
    ({"logp": torch.zeros(2, 5, dtype=torch.long)}, "logp must be a floating-point"),
    ({"advantages": torch.zeros(2, 5, dtype=torch.int32)}, "advantages must be a floating-point"),
    ({"old_logp": [0.0] * 10}, "old_logp must be a torch.Tensor"),
    ({"eps_low": -0.1}, "eps_low"),
    ({"eps_low": torch.tensor(0.2)}, "eps_low must be a Python number"),
    ({"kl_coef": True}, "kl_coef must be a Python number"),
    ({"eps_high": -0.01}, "eps_high"),
    ({"eps_high": math.nan}, "eps_high"),
    ({"dual_clip": 1.0}, "dual_clip"),
    ({"dual_clip": 0.5}, "dual_clip"),
    ({"kl_estimator": "k4"}, "kl_estimator"),
    ({"kl_coef": 0.1}, "needs ref_logp"),
    ({"kl_coef": -1.0}, "kl_coef"),
    ({"log_ratio_clamp": 0.0}, "log_ratio_clamp"),
    ({"impl": "cuda"}, "impl"),
    ({"logp": torch.tensor(0.0), "old_logp": torch.tensor(0.0), "advantages": torch.tensor(0.0),
      "loss_mask": torch.tensor(True)}, "at least one dim"),
])
def test_bad_input_names_the_argument(over, match):
    with pytest.raises((ValueError, TypeError), match=match):
        args = _bad(**over)
        policy_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), args.pop("loss_mask"), **args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_matches_float64(dtype):
    """Compiled kernel (libdevice exp, 4096-wide blocks) on a size with several blocks."""
    inputs = make_inputs((3, 400_001), dtype, seed=37)
    _, _, stats = check_vs_float64(inputs, "triton", dual_clip=3.0, kl_coef=0.05)
    assert int(stats["num_tokens"]) == int(inputs["loss_mask"].sum())


@triton.jit
def _bf16_round_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, _fp32_to_bf16_rtne(tl.load(x_ptr + offs, mask=offs < N)), mask=offs < N)


def test_bf16_gradient_rounding_is_torchs():
    """The kernel's fp32 -> bf16 rounding (written out: the interpreter's cast truncates) is
    bitwise torch's round-to-nearest-even, over the whole range, ties, inf, NaN and denormals."""
    g = torch.Generator().manual_seed(43)
    scale = 10.0 ** torch.randint(-40, 38, (3000,), generator=g).double()
    special = [math.inf, -math.inf, math.nan, 0.0, -0.0, 3.3895e38, 3.40282e38, 1e-45, -2e-40, 1 + 2**-8, 1 + 3 * 2**-8]
    x = torch.cat([(torch.randn(3000, generator=g, dtype=torch.float64) * scale).float(), torch.tensor(special)])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    y = torch.empty(x.numel(), dtype=torch.bfloat16, device=dev)
    _bf16_round_kernel[(1,)](x.to(dev), y, x.numel(), BLOCK=4096)
    y, expect = y.cpu(), x.to(torch.bfloat16)
    assert ((y.view(torch.int16) == expect.view(torch.int16)) | (y.isnan() & expect.isnan())).all()


_COMPILE_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
if "nvidia" not in triton.backends.backends:
    print("SKIP: no NVIDIA backend in this Triton"); sys.exit(0)
import importlib
pl = importlib.import_module("sailor_engine.kernels.policy_loss")  # the package exports the function under this name
target = GPUTarget("cuda", 90, 32)
flags = ["ADV_PER_SEQ", "DUAL_CLIP", "HAS_REF", "KL_IN_LOSS", "WRITE_GRAD"]
variants = [("bf16", "i1", (1, 1, 1, 1, 1), 3), ("fp32", "fp32", (0, 0, 0, 0, 0), 3),
            ("fp16", "i32", (0, 1, 1, 0, 1), 1), ("bf16", "i1", (1, 0, 1, 1, 0), 2)]
for dt, mask, on, kl in variants:
    const = dict(zip(flags, map(bool, on)), KL_ESTIMATOR=kl, EXACT_EXP=True, BLOCK=4096)
    sig = {"logp_ptr": "*" + dt, "old_ptr": "*" + dt, "adv_ptr": "*" + dt, "mask_ptr": "*" + mask,
           "ref_ptr": "*" + dt, "loss_ptr": "*fp32", "dlogp_ptr": "*fp32", "part_ptr": "*fp32", "N": "i32",
           "T": "i32", "lo": "fp32", "hi": "fp32", "dual_c": "fp32", "max_log_ratio": "fp32", "kl_coef": "fp32"}
    sig.update({k: "constexpr" for k in const})
    triton.compile(ASTSource(pl._policy_loss_fwd_kernel, sig, const), target=target, options={"num_warps": 8})
sig = {"part_ptr": "*fp32", "stats_ptr": "*fp32", "count_ptr": "*i64", "num_blocks": "i32", "BLOCK": "constexpr"}
triton.compile(ASTSource(pl._policy_loss_stats_kernel, sig, {"BLOCK": 1024}), target=target)
sig = {"grad_out_ptr": "*fp32", "stride_go": "i32", "dlogp_ptr": "*fp32", "mask_ptr": "*i1", "grad_ptr": "*bf16",
       "N": "i32", "BLOCK": "constexpr"}
triton.compile(ASTSource(pl._policy_loss_bwd_kernel, sig, {"BLOCK": 4096}), target=target, options={"num_warps": 8})
print("OK")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels are compiled and run by the tests")
def test_kernels_compile_for_hopper():
    """Compile the kernels for sm_90 with Triton's NVIDIA backend (no GPU needed), without the
    interpreter, so GPU-only code-generation errors (libdevice, constexpr branches) show in CPU CI."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
