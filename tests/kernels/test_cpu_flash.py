"""The C varlen training attention (csrc/cpu_flash.c): forward and gradients against float64, bit-for-bit
invariance to the thread count and to the rest of the pack, bad input, and the model's native backend."""

import shutil

import pytest
import torch

from sailor_engine.kernels import cpu_flash as cf
from sailor_engine.kernels.reference import varlen_attention_reference

if not any(map(shutil.which, ("cc", "gcc", "clang"))):
    pytest.skip("no C compiler on this machine: the kernel cannot be built", allow_module_level=True)


def test_builds_here():
    """A machine with a compiler builds it: a failed build is a failure, not a skip."""
    assert cf.available(), cf.status()


def reference(q, k, v, lens):
    """float64 causal softmax(q k^T / sqrt(d)) v, sequence by sequence (kernels.reference)."""
    return varlen_attention_reference(q.double(), k.double(), v.double(), torch.tensor([0, *lens]).cumsum(0))


def inputs(lens, H, kvh, d, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    N = sum(lens)
    q, k = torch.randn(N, H, d, generator=g) * scale, torch.randn(N, kvh, d, generator=g) * scale
    v, do = torch.randn(N, kvh, d, generator=g), torch.randn(N, H, d, generator=g)
    cu = torch.tensor([0, *lens]).cumsum(0)
    return q, k, v, do, cu


def run(q, k, v, do, cu, split=None):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = cf.flash_varlen(q, k, v, cu, split=split)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


# block edges: the kernel tiles queries by 16 and keys by 64 (lengths 1, 15-17, 63-65, 130 and 200 cross them)
@pytest.mark.parametrize("lens,H,kvh,d", [
    ([5, 70, 1, 130], 4, 2, 32), ([200], 8, 2, 64), ([17, 33, 16], 2, 1, 16), ([65, 3, 64, 63], 4, 4, 128),
    ([40, 15], 16, 1, 48), ([0, 9, 0], 6, 3, 32)],
    ids=["demo", "g4-d64", "mqa-d16", "mha-d128", "g16-d48", "empty-seqs"])
def test_matches_float64_forward_and_gradients(lens, H, kvh, d):
    q, k, v, do, cu = inputs(lens, H, kvh, d)
    out, dq, dk, dv = run(q, k, v, do, cu)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref = reference(qd, kd, vd, lens)
    ref.backward(do.double())
    for name, got, want in (("out", out, ref.detach()), ("dq", dq, qd.grad), ("dk", dk, kd.grad), ("dv", dv, vd.grad)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 1e-5, (name, float(err))


def test_peaked_softmax_stays_finite_and_exact():
    """Scores ~100 apart (a model sure of one key): the running max rescales without overflow or NaN."""
    q, k, v, do, cu = inputs([150, 20], 4, 2, 32, seed=3, scale=8.0)
    out, dq, dk, dv = run(q, k, v, do, cu)
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref = reference(qd, kd, vd, [150, 20])
    ref.backward(do.double())
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dv.double(), vd.grad, atol=1e-4, rtol=1e-4)


def test_bitwise_the_same_on_any_thread_count_and_in_any_pack():
    """A sequence's outputs and gradients do not depend on the threads or on the sequences beside it."""
    lens = [70, 130, 1, 33]
    q, k, v, do, cu = inputs(lens, 4, 2, 32, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(q, k, v, do, cu)
        torch.set_num_threads(3)
        three = run(q, k, v, do, cu)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three):
        assert torch.equal(a, b)
    s, L = 70, 130  # the second sequence alone
    alone = run(*(x[s:s + L] for x in (q, k, v, do)), torch.tensor([0, L]))
    for packed, single in zip(one[:2], alone[:2]):  # out, dq: query rows of that sequence
        assert torch.equal(packed[s:s + L], single)
    for packed, single in zip(one[2:], alone[2:]):  # dk, dv
        assert torch.equal(packed[s:s + L], single)


@pytest.mark.parametrize("lens,H,kvh,d", [([300, 5, 700], 4, 2, 32), ([1000], 8, 1, 64), ([130, 129], 2, 2, 16)])
def test_splitting_long_sequences_changes_no_bit(lens, H, kvh, d):
    """Chunks of queries (forward, dq) and keys (dk, dv) of any size, chosen or automatic, on 1 or 3
    threads: the same bits as whole sequences."""
    q, k, v, do, cu = inputs(lens, H, kvh, d, seed=2)
    whole = run(q, k, v, do, cu, split=0)
    threads = torch.get_num_threads()
    try:
        for split in (None, 64, 128, 256):
            for t in (1, 3):
                torch.set_num_threads(t)
                for a, b in zip(whole, run(q, k, v, do, cu, split=split)):
                    assert torch.equal(a, b), (split, t)
    finally:
        torch.set_num_threads(threads)


def test_bad_input_is_a_clear_error():
    q, k, v, do, cu = inputs([4, 4], 4, 2, 32)
    with pytest.raises(ValueError, match="float32"):
        cf.flash_varlen(q.double(), k, v, cu)
    with pytest.raises(ValueError, match="H a multiple of kv_heads"):
        cf.flash_varlen(q[:, :3], k, v, cu)
    with pytest.raises(ValueError, match="head_dim a multiple of 16"):
        cf.flash_varlen(q[..., :24], k[..., :24], v[..., :24], cu)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to the 8 tokens"):
        cf.flash_varlen(q, k, v, torch.tensor([0, 4, 7]))
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        cf.flash_varlen(q, k, v, torch.tensor([0, 5, 4, 8]))
    with pytest.raises(ValueError, match="split must be None, 0 or a multiple of 64"):
        cf.flash_varlen(q, k, v, cu, split=100)


def test_the_model_trains_the_same_through_native_and_sdpa():
    """A GQA model's packed forward and every parameter gradient agree between the two CPU backends, and
    auto picks native on the CPU for float32 (sdpa for a head_dim the kernel does not take)."""
    from sailor_engine.model import ModelConfig, Transformer, resolve_backend

    cfg = ModelConfig(family="qwen2", vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, qkv_bias=True)
    lens = [70, 1, 130, 17]
    ids = torch.randint(0, 101, (sum(lens),), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, *lens]).cumsum(0)
    got = {}
    for backend in ("native", "sdpa"):
        import msgspec

        torch.manual_seed(0)
        model = Transformer(msgspec.structs.replace(cfg, attn_backend=backend))
        model.init_weights(std=0.2, generator=torch.Generator().manual_seed(1))
        hidden = model.forward_packed(ids, cu)
        model.logits(hidden).logsumexp(-1).mean().backward()
        got[backend] = hidden.detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(got["native"][0], got["sdpa"][0], atol=1e-5, rtol=1e-5)
    for n, g in got["sdpa"][1].items():
        torch.testing.assert_close(got["native"][1][n], g, atol=1e-5, rtol=1e-4, msg=n)
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32, head_dim=16, group=2) == "native"
    assert resolve_backend("auto", cpu, torch.float32, head_dim=8, group=2) == "sdpa"
    assert resolve_backend("auto", cpu, torch.bfloat16, head_dim=32, group=2) == "sdpa"
    with pytest.raises(RuntimeError, match="'native' was forced but is unavailable: needs float32"):
        resolve_backend("native", cpu, torch.bfloat16, head_dim=32, group=2)
    with pytest.raises(RuntimeError, match="'native' was forced but is unavailable: takes head_dim"):
        resolve_backend("native", cpu, torch.float32, head_dim=8, group=2)
    with pytest.raises(RuntimeError, match="'native' was forced but is unavailable: needs the CPU"):
        resolve_backend("native", torch.device("cuda"), torch.float32, head_dim=32, group=2)
