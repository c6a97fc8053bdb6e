"""fused_linear_logprob against a float64 reference: forward, entropy, grads, both implementations.

Each implementation runs in the working dtype and is compared with float64 ground truth; it passes
if its error is at most 2x that of the same-dtype reference (kernels/reference.py) plus a small
floor. The Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on tiny shapes.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sailor_engine.kernels import logprob as lp
from sailor_engine.kernels.logprob import fused_linear_logprob
from sailor_engine.kernels.reference import linear_logprob_reference, naive_linear_logprob

IGNORE = -100

# (dtype, atol, rtol): the floor added to 2x the same-dtype reference error, rtol relative to max|truth|.
TOLERANCES = [
    pytest.param(torch.float32, 1e-7, 1e-7, id="fp32"),
    pytest.param(torch.bfloat16, 1e-5, 1e-4, id="bf16"),
]


def _problem(n, h, v, *, seed=0, bias=True, ignore_rows=(), scale=3.0):
    """float64 leaves: hidden (n, h), weight (v, h), bias (v,), targets (n,) hitting both vocab ends, grad (n,)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (scale / h**0.5)
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[0] = 0
    targets[-1] = v - 1
    for r in ignore_rows:
        targets[r] = IGNORE
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    return hidden, weight, b, targets, g


def _run(fn, hidden, weight, bias, targets, g, dtype, ge=None, **kw):
    """fn on copies of the leaves cast to dtype: (logp, entropy, dH, dW, db) as float64; the grads are
    of sum(g * logp), plus sum(ge * entropy) when ge is given (an entropy bonus)."""
    leaves = [None if x is None else x.detach().to(dtype).requires_grad_() for x in (hidden, weight, bias)]
    logp, ent = fn(leaves[0], leaves[1], targets, bias=leaves[2], return_entropy=True, ignore_index=IGNORE, **kw)
    loss = (logp.double() * g).sum()
    if ge is not None:
        loss = loss + (ent.double() * ge).sum()
    loss.backward()
    grads = [None if x is None else x.grad.double() for x in leaves]
    return [logp.detach().double(), ent.double(), *grads]


def _assert_close(ours, ref, truth, atol, rtol, names=("logp", "entropy", "dH", "dW", "db")):
    for name, o, r, t in zip(names, ours, ref, truth):
        if t is None:
            assert o is None, name
            continue
        floor = atol + rtol * t.abs().max().item()
        err, ref_err = (o - t).abs().max().item(), (r - t).abs().max().item()
        assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} > 2 x reference's {ref_err:.3g} + {floor:.3g}"


def _rounded(dtype, *xs):
    """The float64 leaves as the working dtype sees them: truth then measures compute error only."""
    return [None if x is None else x.to(dtype).double() for x in xs]


def _compare(impl, n, h, v, dtype, atol, rtol, temperature=1.0, entropy_grad=False, **problem_kw):
    hidden, weight, bias, targets, g = _problem(n, h, v, **problem_kw)
    kw = dict(temperature=temperature)
    if entropy_grad:
        kw["ge"] = torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    hidden, weight, bias = _rounded(dtype, hidden, weight, bias)
    truth = _run(linear_logprob_reference, hidden, weight, bias, targets, g, torch.float64, **kw)
    ref = _run(linear_logprob_reference, hidden, weight, bias, targets, g, dtype, **kw)
    ours = _run(fused_linear_logprob, hidden, weight, bias, targets, g, dtype, impl=impl, **kw)
    _assert_close(ours, ref, truth, atol, rtol)
    assert ours[0].max().item() <= 0.0
    return ours, truth


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("n, v", [(1, 1), (5, 1000), (123, 1000), (5, 65537)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("tile_elems", [lp._TORCH_TILE_ELEMS, 4096])  # one vocab chunk; many
def test_torch_path_matches_reference(n, v, temperature, tile_elems, dtype, atol, rtol, monkeypatch):
    monkeypatch.setattr(lp, "_TORCH_TILE_ELEMS", tile_elems)
    _compare("torch", n, 32, v, dtype, atol, rtol, temperature=temperature, ignore_rows=(1,) if n > 2 else ())


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
# 65: one past a 64-wide vocab tile; 150 rows: 10 row blocks, so two backward swizzle groups (8 + 2)
@pytest.mark.parametrize("n, h, v", [(1, 8, 1), (5, 40, 65), (33, 64, 300), (150, 16, 70)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_triton_kernels_match_reference(n, h, v, temperature, dtype, atol, rtol):
    _compare("triton", n, h, v, dtype, atol, rtol, temperature=temperature, ignore_rows=(2,) if n > 3 else ())


def test_triton_and_torch_paths_agree():
    hidden, weight, bias, targets, g = _problem(17, 48, 257, ignore_rows=(3,))
    a = _run(fused_linear_logprob, hidden, weight, bias, targets, g, torch.float32, impl="triton", temperature=0.7)
    b = _run(fused_linear_logprob, hidden, weight, bias, targets, g, torch.float32, impl="torch", temperature=0.7)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=2e-5)


def test_vocab_one_is_certain():
    # softmax over a single entry: logp exactly 0, entropy 0, no gradient
    for impl in ("torch", "triton"):
        out = _run(fused_linear_logprob, *_problem(4, 8, 1), torch.float32, impl=impl)
        for t in out:
            assert torch.equal(t, torch.zeros_like(t)), impl


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_chunking_is_invisible(impl, monkeypatch):
    """Many row blocks / vocab chunks / backward chunks give the same result as one."""
    problem = _problem(21, 16, 150, ignore_rows=(4,))
    whole = _run(fused_linear_logprob, *problem, torch.float32, impl=impl, temperature=0.7)
    monkeypatch.setattr(lp, "_TORCH_TILE_ELEMS", 8 * 24)
    monkeypatch.setattr(lp, "_TORCH_MAX_ROWS", 8)
    monkeypatch.setattr(lp, "_BWD_CHUNK_BYTES", 6 * 150 * 4)
    assert lp._torch_tiles(21, 150) == (8, 24)
    chunked = _run(fused_linear_logprob, *problem, torch.float32, impl=impl, temperature=0.7)
    for x, y in zip(whole, chunked):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_triton_vocab_splits_merge_exactly(splits, monkeypatch):
    """More forward splits than vocab tiles (some splits empty, as on a GPU with a small vocab)."""
    from sailor_engine.kernels import _logprob_triton as tk

    problem = _problem(20, 24, 150, ignore_rows=(6,))  # 3 vocab tiles of 64 under the interpreter
    monkeypatch.setattr(tk, "_num_splits", lambda n, v, device: splits)
    ours = _run(fused_linear_logprob, *problem, torch.float32, impl="triton", temperature=0.7)
    torch_path = _run(fused_linear_logprob, *problem, torch.float32, impl="torch", temperature=0.7)
    for x, y in zip(ours, torch_path):
        torch.testing.assert_close(x, y, atol=2e-6, rtol=2e-6)


def test_gradcheck_float64_torch_path(monkeypatch):
    # tiny tiles: the online merge across vocab chunks and row blocks is differentiated too
    monkeypatch.setattr(lp, "_TORCH_TILE_ELEMS", 6)
    monkeypatch.setattr(lp, "_TORCH_MAX_ROWS", 2)
    hidden, weight, bias, targets, _ = _problem(5, 3, 7, ignore_rows=(2,))
    leaves = [x.requires_grad_() for x in (hidden, weight, bias)]
    fn = lambda h, w, b: fused_linear_logprob(h, w, targets, bias=b, temperature=0.7, impl="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), h=st.integers(1, 24), v=st.integers(1, 300), tile=st.integers(1, 600),
       rows=st.integers(1, 50), temperature=st.floats(0.25, 4.0), seed=st.integers(0, 2**16))
def test_torch_path_float64_any_shape_and_tiling(n, h, v, tile, rows, temperature, seed):
    """float64 in, float64 math: the chunked path equals the reference to rounding, whatever the tiling."""
    hidden, weight, bias, targets, g = _problem(n, h, v, seed=seed, ignore_rows=range(0, n, 3)[1:])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lp, "_TORCH_TILE_ELEMS", tile)
        mp.setattr(lp, "_TORCH_MAX_ROWS", rows)
        ours = _run(fused_linear_logprob, hidden, weight, bias, targets, g, torch.float64, impl="torch",
                    temperature=temperature)
    truth = _run(linear_logprob_reference, hidden, weight, bias, targets, g, torch.float64, temperature=temperature)
    for o, t in zip(ours, truth):
        torch.testing.assert_close(o, t, atol=1e-12, rtol=1e-10)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 20), h=st.integers(1, 40), v=st.integers(1, 200), temperature=st.floats(0.5, 2.0),
       seed=st.integers(0, 2**16))
def test_triton_any_shape(n, h, v, temperature, seed):
    """Odd shapes under the interpreter (masked rows, columns and H tails) vs the float64 reference."""
    hidden, weight, bias, targets, g = _problem(n, h, v, seed=seed)
    problem = (*_rounded(torch.float32, hidden, weight, bias), targets, g)
    ours = _run(fused_linear_logprob, *problem, torch.float32, impl="triton", temperature=temperature)
    ref = _run(linear_logprob_reference, *problem, torch.float32, temperature=temperature)
    truth = _run(linear_logprob_reference, *problem, torch.float64, temperature=temperature)
    _assert_close(ours, ref, truth, 1e-6, 1e-6)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_ignore_index_rows_are_inert(impl):
    hidden, weight, bias, targets, g = _problem(9, 16, 70, ignore_rows=(0, 4, 8))
    out = _run(fused_linear_logprob, hidden, weight, bias, targets, g, torch.float32, impl=impl)
    keep = targets != IGNORE
    assert torch.all(out[0][~keep] == 0) and torch.all(out[1][~keep] == 0)
    assert torch.all(out[2][~keep] == 0)
    # the ignored rows contribute nothing: same as running on the kept rows only
    sub = _run(fused_linear_logprob, hidden[keep], weight, bias, targets[keep], g[keep], torch.float32, impl=impl)
    torch.testing.assert_close(out[0][keep], sub[0])
    torch.testing.assert_close(out[3], sub[3], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[4], sub[4], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_gives_zeros(impl, dtype):
    hidden, weight, bias, _, g = _problem(6, 16, 50)
    targets = torch.full((6,), IGNORE)
    out = _run(fused_linear_logprob, hidden, weight, bias, targets, g, dtype, impl=impl, temperature=0.7)
    for t in out:
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprob_never_positive_on_peaked_rows(impl, dtype):
    """Targets that own nearly all the mass (margins 8..40): logp rounds to 0 or just below, never above."""
    gen = torch.Generator().manual_seed(3)
    n, h, v = 16, 96, 90
    weight = torch.eye(v, h, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=gen)
    margin = torch.linspace(8.0, 40.0, n, dtype=torch.float64)
    hidden = margin[:, None] * weight[targets] + 0.1 * torch.randn(n, h, generator=gen, dtype=torch.float64)
    logp, ent = fused_linear_logprob(hidden.to(dtype), weight.to(dtype), targets, return_entropy=True, impl=impl)
    truth = linear_logprob_reference(hidden.to(dtype).double(), weight, targets)
    assert logp.dtype == torch.float32 and torch.isfinite(logp).all()
    assert (logp <= 0).all() and (ent >= 0).all()
    assert (logp == 0).any()  # the clamp's regime is reached: p(target) rounds to 1
    torch.testing.assert_close(logp.double(), truth, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_no_tokens(impl):
    hidden, weight, bias, targets, g = _problem(3, 8, 20)
    out = _run(fused_linear_logprob, hidden[:0], weight, bias, targets[:0], g[:0], torch.float32, impl=impl)
    assert out[0].shape == out[1].shape == (0,) and out[2].shape == (0, 8)
    assert torch.equal(out[3], torch.zeros_like(out[3])) and torch.equal(out[4], torch.zeros_like(out[4]))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_huge_logits_are_stable(impl):
    hidden, weight, bias, targets, g = _problem(7, 16, 200, scale=3e3)
    out = _run(fused_linear_logprob, hidden, weight, bias, targets, g, torch.float32, impl=impl)
    truth = _run(linear_logprob_reference, hidden, weight, bias, targets, g, torch.float64)
    for o, t in zip(out, truth):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, t, atol=1e-3 * max(1.0, t.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_entropy_outside_the_loss_changes_nothing_and_output_fp32(impl):
    """The entropy is differentiable; a caller that only reads it (a metric) gets the logp-only
    gradients bit for bit, as from a call without return_entropy."""
    hidden, weight, _, targets, g = _problem(5, 8, 20, bias=False)
    grads = []
    for want in (False, True):
        h = hidden.bfloat16().requires_grad_()
        out = fused_linear_logprob(h, weight.bfloat16(), targets, return_entropy=want, impl=impl)
        logp = out[0] if want else out
        if want:
            assert logp.dtype == out[1].dtype == torch.float32 and out[1].requires_grad
            float(out[1].detach().sum())  # read (as the metric is), not differentiated
        (logp * g.float()).sum().backward()
        grads.append((logp.detach(), h.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("impl, n, h, v", [("torch", 123, 32, 1000), ("torch", 5, 32, 65537), ("triton", 33, 64, 300),
                                           ("triton", 150, 16, 70)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_gradient_matches_reference(impl, n, h, v, temperature, dtype, atol, rtol):
    """d(sum g logp + ge H)/d(hidden, weight, bias): the entropy bonus's gradient, against float64 autograd."""
    _compare(impl, n, h, v, dtype, atol, rtol, temperature=temperature, entropy_grad=True, ignore_rows=(2,))


def test_entropy_gradcheck_float64_torch_path(monkeypatch):
    monkeypatch.setattr(lp, "_TORCH_TILE_ELEMS", 6)
    monkeypatch.setattr(lp, "_TORCH_MAX_ROWS", 2)
    hidden, weight, bias, targets, _ = _problem(5, 3, 7, ignore_rows=(2,))
    leaves = [x.requires_grad_() for x in (hidden, weight, bias)]

    def fn(h, w, b):
        return fused_linear_logprob(h, w, targets, bias=b, temperature=0.7, impl="torch", return_entropy=True)

    assert torch.autograd.gradcheck(fn, leaves)


def test_leading_dims_and_frozen_weight():
    hidden, weight, bias, targets, g = _problem(12, 16, 30)
    full = _run(fused_linear_logprob, hidden, weight, bias, targets, g, torch.float32)
    h = hidden.float().reshape(3, 4, 16).requires_grad_()
    logp = fused_linear_logprob(h, weight.float(), targets.reshape(3, 4), bias=bias.float(), ignore_index=IGNORE)
    assert logp.shape == (3, 4)
    (logp.double() * g.reshape(3, 4)).sum().backward()
    torch.testing.assert_close(logp.reshape(-1).double(), full[0])
    torch.testing.assert_close(h.grad.reshape(12, 16).double(), full[2])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_strided_inputs_are_used_in_place(impl):
    """Row-strided views (a slice of a wider matrix) and a transposed copy give the same result."""
    hidden, weight, bias, targets, g = _problem(10, 24, 77, ignore_rows=(5,))
    dense = _run(fused_linear_logprob, hidden, weight, bias, targets, g, torch.float32, impl=impl)
    wide_h = torch.cat([hidden, hidden], 1).float()[:, :24].requires_grad_()  # row stride 48
    w_t = weight.float().T.contiguous().T.requires_grad_()  # column-major (77, 24)
    logp = fused_linear_logprob(wide_h, w_t, targets, bias=bias.float(), ignore_index=IGNORE, impl=impl)
    (logp.double() * g).sum().backward()
    torch.testing.assert_close(logp.double(), dense[0])
    torch.testing.assert_close(wide_h.grad.double(), dense[2])
    torch.testing.assert_close(w_t.grad.double(), dense[3])


def test_naive_peer_matches_reference():
    hidden, weight, bias, targets, _ = _problem(6, 16, 40)
    naive = naive_linear_logprob(hidden.bfloat16(), weight.bfloat16(), targets, bias=bias.bfloat16(), temperature=0.7)
    assert naive.dtype == torch.float32  # the peer upcasts the logits, as trainers do
    truth = linear_logprob_reference(*(x.bfloat16().double() for x in (hidden, weight)), targets,
                                     bias=bias.bfloat16().double(), temperature=0.7)
    # logits rounded to bf16 once, then fp32 math
    torch.testing.assert_close(naive.double(), truth, atol=0.05, rtol=0.02)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(weight=torch.zeros(10, 7)), ValueError, "weight is \\(10, 7\\) but hidden has H=8"),
        (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, "targets shape"),
        (dict(targets=torch.zeros(4)), TypeError, "targets must be an integer"),
        (dict(targets=torch.tensor([0, 1, 10, 2])), ValueError, "targets contain 10, outside \\[0, 10\\)"),
        (dict(targets=torch.tensor([0, -1, 2, 2])), ValueError, "targets contain -1"),
        (dict(hidden=torch.zeros(4, 8, dtype=torch.long)), TypeError, "hidden must be floating"),
        (dict(weight=torch.zeros(10, 8, dtype=torch.float64)), TypeError, "weight dtype"),
        (dict(bias=torch.zeros(9)), ValueError, "bias shape \\(9,\\)"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(impl="cuda"), ValueError, "impl must be"),
        (dict(weight=torch.zeros(0, 8)), ValueError, "empty vocab"),
    ],
)
def test_bad_input_is_named(change, error, match):
    args = dict(hidden=torch.zeros(4, 8), weight=torch.zeros(10, 8), targets=torch.tensor([0, 9, IGNORE, 3]),
                bias=None, temperature=1.0, impl="auto")
    args.update(change)
    with pytest.raises(error, match=match):
        fused_linear_logprob(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


def test_triton_rejects_float64():
    with pytest.raises(ValueError, match="impl='triton' supports"):
        fused_linear_logprob(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64),
                             torch.zeros(2, dtype=torch.long), impl="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("entropy_grad", [False, True], ids=["logp", "logp+entropy"])
def test_triton_on_cuda_matches_reference(dtype, atol, rtol, entropy_grad):
    """Real GPU: autotuned configs, tensor-core dots, several vocab splits, V > 64k."""
    hidden, weight, bias, targets, g = (None if x is None else x.cuda() for x in _problem(1151, 256, 65537,
                                                                                      ignore_rows=(7,)))
    hidden, weight, bias = _rounded(dtype, hidden, weight, bias)
    kw = dict(temperature=0.7)
    if entropy_grad:
        kw["ge"] = torch.randn(len(targets), generator=torch.Generator().manual_seed(7), dtype=torch.float64).cuda()
    truth = _run(linear_logprob_reference, hidden, weight, bias, targets, g, torch.float64, **kw)
    ref = _run(linear_logprob_reference, hidden, weight, bias, targets, g, dtype, **kw)
    ours = _run(fused_linear_logprob, hidden, weight, bias, targets, g, dtype, impl="triton", **kw)
    _assert_close(ours, ref, truth, atol, rtol)
    assert ours[0].max().item() <= 0.0


_AOT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sailor_engine.kernels import _logprob_triton as tk

common = {"N": "i32", "V": "i32", "H": "i32", "stride_hn": "i32", "stride_wv": "i32"}
for dt in ("bf16", "fp32"):
    p = "*" + dt
    dot = {"DOT_FP32": dt == "fp32", "INPUT_PRECISION": "ieee" if dt == "fp32" else "tf32"}
    fwd = {"h_ptr": p, "w_ptr": p, "b_ptr": p, "tgt_ptr": "*i64", "stats_ptr": "*fp32", **common, "inv_t": "fp32"}
    bwd = {"h_ptr": p, "w_ptr": p, "b_ptr": p, "tgt_ptr": "*i64", "m_ptr": "*fp32", "logs_ptr": "*fp32",
           "g_ptr": "*fp32", "ge_ptr": "*fp32", "ent_ptr": "*fp32",
           "dz_ptr": p, **common, "stride_dzn": "i32", "inv_t": "fp32"}
    for kernel, sig, flags in ((tk._logprob_fwd_kernel, fwd, {"HAS_BIAS": True, "WANT_ENTROPY": True}),
                               (tk._logprob_bwd_kernel, bwd, {"HAS_BIAS": True, "HAS_ENT": False, "GROUP_N": 8}),
                               (tk._logprob_bwd_kernel, bwd, {"HAS_BIAS": True, "HAS_ENT": True, "GROUP_N": 8})):
        cfg = kernel.configs[0]
        consts = {**flags, **dot, **cfg.kwargs}
        sig = {**sig, **{k: "constexpr" for k in consts}}
        triton.compile(ASTSource(kernel.fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter forgives what the compiler does not (e.g. non-constexpr globals): build real
    sm_90 cubins (ttir -> ptx -> ptxas) for both kernels, bf16 and fp32, with the GPU autotune configs."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
