"""The C cached-attention kernel (csrc/cpu_attention.c): float64 reference, bit-for-bit invariance to
batching and chunking, the cache append, bad input, and the build / fallback switches."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from sailor_engine.kernels import cpu_attention as ca

if not any(map(shutil.which, ("cc", "gcc", "clang"))):
    pytest.skip("no C compiler on this machine: the kernel cannot be built", allow_module_level=True)


def test_builds_here():
    """A machine with a compiler builds it: a failed build is a failure, not a skip."""
    assert ca.available(), ca.status()


def reference(q, kc, vc, slots, nvis):
    """float64 softmax(q K^T / sqrt(d)) V per row, GQA by repeat_interleave."""
    H, d = q.shape[1:]
    g = H // kc.shape[1]
    out = []
    for i in range(len(q)):
        K = kc[slots[i], :, :, : nvis[i]].double().repeat_interleave(g, 0)  # (H, d, K)
        V = vc[slots[i], :, : nvis[i]].double().repeat_interleave(g, 0)  # (H, K, d)
        s = torch.einsum("hd,hdk->hk", q[i].double(), K) / math.sqrt(d)
        out.append(torch.einsum("hk,hkd->hd", s.softmax(-1), V))
    return torch.stack(out)


def cache(S, kvh, d, cap, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, kvh, d, cap, generator=g) * scale, torch.randn(S, kvh, cap, d, generator=g)


@pytest.mark.parametrize("H,kvh,d", [(4, 2, 32), (6, 2, 8), (7, 1, 64), (12, 2, 128), (20, 2, 24), (3, 3, 16)],
                         ids=["demo", "d8", "g7", "g6-d128", "g10-split", "mha"])
def test_matches_float64(H, kvh, d):
    """Shapes of the specialised paths and the generic one: g > 8 (split into groups), d not a
    multiple of 16 (partial last chunk), nvis of 1, of a block edge and of the whole capacity."""
    kc, vc = cache(5, kvh, d, 96)
    q = torch.randn(7, H, d, generator=torch.Generator().manual_seed(1))
    slots = torch.tensor([3, 0, 4, 3, 1, 2, 0])
    nvis = torch.tensor([1, 16, 17, 96, 50, 33, 2])
    out = ca.cached_attention(q, kc, vc, slots, nvis)
    torch.testing.assert_close(out.double(), reference(q, kc, vc, slots, nvis), atol=2e-6, rtol=2e-6)


def test_peaked_scores_and_strided_queries():
    """Scores spread over hundreds (exp's clamp at -87, one dominant key) and q a strided view (a
    slice of the fused qkv rows): as close to float64 as torch's own fp32 attention is (the scores'
    fp32 rounding, ~|s| * 6e-8, dominates both)."""
    kc, vc = cache(2, 2, 32, 64, scale=30.0)
    qkv = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(4))
    q = qkv[:, :4]
    slots, nvis = torch.tensor([0, 1, 0, 1]), torch.tensor([64, 5, 30, 64])
    out = ca.cached_attention(q, kc, vc, slots, nvis)
    want = reference(q, kc, vc, slots, nvis)
    torch_err = 0.0  # the same attention in fp32 torch ops
    for i in range(4):
        K = kc[slots[i], :, :, : nvis[i]].repeat_interleave(2, 0)
        V = vc[slots[i], :, : nvis[i]].repeat_interleave(2, 0)
        t = torch.einsum("hd,hdk->hk", q[i], K) / math.sqrt(32)
        torch_err = max(torch_err, (torch.einsum("hk,hkd->hd", t.softmax(-1), V).double() - want[i]).abs().max().item())
    ours = (out.double() - want).abs().max().item()
    assert torch_err > 1e-6  # the case is hard for fp32
    assert ours <= 2 * torch_err, (ours, torch_err)


def test_a_row_is_bitwise_the_same_alone_in_any_batch_and_any_cache():
    """The property the Generator relies on: row i's output depends on its query and its row's first
    nvis keys only: not on the other rows, their lengths, its position in the call, its cache slot,
    the cache's capacity, or stale values past nvis."""
    kc, vc = cache(6, 2, 32, 272)
    q = torch.randn(24, 4, 32, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    slots = torch.randint(0, 6, (24,), generator=gen)
    nvis = torch.randint(1, 273, (24,), generator=gen)
    batch = ca.cached_attention(q, kc, vc, slots, nvis)
    big = [t.repeat(5, *[1] * (t.dim() - 1)) for t in (q, slots, nvis)]
    assert int(big[2].sum()) * 4 > 3 * 16384  # enough keys for three threads to start (KEYS_PER_THREAD)
    n = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):  # rows split between threads: the same bits
            torch.set_num_threads(threads)
            assert torch.equal(ca.cached_attention(*big[:1], kc, vc, *big[1:]), batch.repeat(5, 1, 1))
    finally:
        torch.set_num_threads(n)
    perm = torch.randperm(24, generator=gen)
    assert torch.equal(ca.cached_attention(q[perm], kc, vc, slots[perm], nvis[perm]), batch[perm])
    for i in range(0, 24, 5):
        n = int(nvis[i])
        alone = ca.cached_attention(q[i : i + 1], kc, vc, slots[i : i + 1], nvis[i : i + 1])
        assert torch.equal(alone, batch[i : i + 1])
        # the same keys in a one-slot cache of another capacity, garbage past them
        cap = -(-n // 16) * 16 + 32
        k1, v1 = torch.full((1, 2, 32, cap), 1e30), torch.full((1, 2, cap, 32), -7.0)
        k1[..., :n], v1[:, :, :n] = kc[slots[i], :, :, :n], vc[slots[i], :, :n]
        assert torch.equal(ca.cached_attention(q[i : i + 1], k1, v1, torch.tensor([0]), nvis[i : i + 1]), alone)


@pytest.mark.parametrize("H,kvh,d", [(4, 2, 32), (4, 4, 8), (8, 2, 64), (5, 1, 16)], ids=["g2", "g1-d8", "g4", "g5"])
def test_a_prefill_chunk_gives_each_query_the_bits_it_gets_alone(H, kvh, d):
    """Consecutive queries of one row (a prefill chunk) run in blocks sharing loads of K and V: each
    query still gets exactly what it gets alone (a decode step), wherever the chunk starts and ends."""
    kc, vc = cache(3, kvh, d, 160, seed=5)
    q = torch.randn(150, H, d, generator=torch.Generator().manual_seed(6))
    pos = torch.arange(5, 155)
    slot = torch.full((150,), 2)
    whole = ca.cached_attention(q, kc, vc, slot, pos + 1)
    alone = torch.cat([ca.cached_attention(q[i : i + 1], kc, vc, slot[:1], pos[i : i + 1] + 1) for i in range(150)])
    assert torch.equal(whole, alone)
    cuts = [0, 3, 4, 11, 64, 65, 150]
    pieces = [ca.cached_attention(q[a:b], kc, vc, slot[a:b], pos[a:b] + 1) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(pieces), whole)
    mixed = torch.tensor([0, 1, 2, 3, 140, 4, 5, 6, 7, 8])  # a decode of another row inside the chunk
    slot2 = slot[mixed].clone()
    slot2[4] = 0
    assert torch.equal(ca.cached_attention(q[mixed], kc, vc, slot2, pos[mixed] + 1)[[0, 1, 2, 3, 5, 6, 7, 8, 9]],
                       whole[mixed[[0, 1, 2, 3, 5, 6, 7, 8, 9]]])
    torch.testing.assert_close(whole.double(), reference(q, kc, vc, slot, pos + 1), atol=2e-6, rtol=2e-6)


def test_append_writes_what_indexing_writes():
    kc, vc = cache(4, 2, 16, 32)
    k, v = torch.randn(3, 2, 16), torch.randn(3, 4, 16)[:, 1:3]  # v: a strided view
    slots, pos = torch.tensor([2, 0, 2]), torch.tensor([0, 31, 7])
    want_k, want_v = kc.clone(), vc.clone()
    want_k[slots, :, :, pos] = k
    want_v[slots, :, pos] = v
    ca.append_kv(kc, vc, k, v, slots, pos)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_bad_input_is_an_error_that_writes_nothing():
    kc, vc = cache(2, 2, 16, 32)
    before = kc.clone(), vc.clone()
    k = v = torch.randn(2, 2, 16)
    with pytest.raises(ValueError, match="row 1: slot 2"):
        ca.append_kv(kc, vc, k, v, torch.tensor([0, 2]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="row 0: slot 0 / position 32"):
        ca.append_kv(kc, vc, k, v, torch.tensor([0, 1]), torch.tensor([32, 0]))
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])
    q = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="row 1: slot 1 / keys 0"):
        ca.cached_attention(q, kc, vc, torch.tensor([0, 1]), torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="row 0: slot -1"):
        ca.cached_attention(q, kc, vc, torch.tensor([-1, 1]), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="float32"):
        ca.cached_attention(q.double(), kc, vc, torch.tensor([0, 1]), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="multiple of 16"):
        ca.cached_attention(q, kc[..., :24].contiguous(), vc[:, :, :24].contiguous(), torch.tensor([0, 1]),
                            torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="heads a multiple of 2"):
        ca.cached_attention(torch.randn(2, 3, 16), kc, vc, torch.tensor([0, 1]), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="expected 2 indices"):
        ca.cached_attention(q, kc, vc, torch.tensor([0]), torch.tensor([3, 3]))


def _probe(env: dict) -> str:
    code = "from sailor_engine.kernels import cpu_attention as ca; print(ca.available(), ca.status())"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          check=True).stdout


def test_build_goes_to_the_cache_dir_and_the_switches_fall_back(tmp_path):
    """A fresh cache dir gets one .so; SAILOR_ENGINE_NATIVE=0 and a missing compiler both leave the
    kernel unavailable with the reason in status() (callers keep the torch path)."""
    out = _probe({"SAILOR_ENGINE_CACHE": str(tmp_path)})
    assert out.startswith("True available")
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]
    out = _probe({"SAILOR_ENGINE_NATIVE": "0"})
    assert out.startswith("False unavailable: disabled by SAILOR_ENGINE_NATIVE=0")
    out = _probe({"SAILOR_ENGINE_CACHE": str(tmp_path / "other"), "CC": str(tmp_path / "no-such-cc")})
    assert out.startswith("False unavailable: FileNotFoundError")
