"""The C decoder forward (csrc/cpu_decoder.c): a float64 reference over whole sequences, bit-for-bit
invariance to batching, chunking and threads, its BLAS calls against torch's, bad input, and the switch."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from sailor_engine.kernels import cpu_decoder as cd

ROW_ALIGN = 4  # csrc/cpu_decoder.c: every GEMM runs on a multiple of this many rows

if not any(map(shutil.which, ("cc", "gcc", "clang"))):
    pytest.skip("no C compiler on this machine: the kernel cannot be built", allow_module_level=True)


def test_available_here():
    """This machine has a compiler and torch's MKL: unavailability would be a failure, not a skip."""
    assert cd.available(), cd.status()


def make(hid=40, H=4, kvh=2, d=16, inter=100, L=2, bias=False, qk_norm=False, seed=0):
    """Random layers (std 0.2: far from identity, so a wrong index shows) and the final norm."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    def norm(n):
        return 1 + r(n, std=0.1)

    qkv = (H + 2 * kvh) * d
    layers = [cd.LayerWeights(norm(hid), r(hid, qkv), r(qkv) if bias else None, norm(d) if qk_norm else None,
                              norm(d) if qk_norm else None, r(H * d, hid), r(hid) if bias else None, norm(hid),
                              r(hid, 2 * inter), r(2 * inter) if bias else None, r(inter, hid), r(hid) if bias else None)
              for _ in range(L)]
    return cd.DecoderWeights(layers, norm(hid), num_heads=H, num_kv_heads=kvh, eps=1e-6)


def tables(positions, d, theta=100.0):
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    f = positions.double()[:, None] * inv
    emb = torch.cat([f, f], -1)
    return emb.cos(), emb.sin()


def reference(w, x):
    """float64, one whole sequence x (T, hidden) at positions 0..T-1, written from the definition."""
    layers, final = w.tensors
    H, kvh, d, eps = w.num_heads, w.num_kv_heads, w.head_dim, w.eps
    T = x.shape[0]
    cos, sin = tables(torch.arange(T), d)

    def rms(v, weight):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight.double()

    def lin(v, m, b):
        return v @ m.double() + (0 if b is None else b.double())

    def rope(v):  # (T, heads, d)
        v1, v2 = v[..., : d // 2], v[..., d // 2:]
        return v * cos[:, None] + torch.cat([-v2, v1], -1) * sin[:, None]

    x = x.double()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for lw in layers:
        qkv = lin(rms(x, lw.input_norm), lw.qkv, lw.qkv_bias).view(T, H + 2 * kvh, d)
        q, k, v = qkv[:, :H], qkv[:, H: H + kvh], qkv[:, H + kvh:]
        if lw.q_norm is not None:
            q, k = rms(q, lw.q_norm), rms(k, lw.k_norm)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // kvh, 1), v.repeat_interleave(H // kvh, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        a = torch.einsum("hqk,khd->qhd", s.masked_fill(~causal, -math.inf).softmax(-1), v)
        x = x + lin(a.reshape(T, H * d), lw.o, lw.o_bias)
        gate, up = lin(rms(x, lw.post_norm), lw.gate_up, lw.gate_up_bias).chunk(2, -1)
        x = x + lin(torch.nn.functional.silu(gate) * up, lw.down, lw.down_bias)
    return rms(x, final)


def new_cache(w, S, cap):
    L, kvh, d = w.num_layers, w.num_kv_heads, w.head_dim
    return torch.zeros(L, S, kvh, d, cap), torch.zeros(L, S, kvh, cap, d)


def run(w, kc, vc, x, slots, positions):
    cos, sin = tables(positions, w.head_dim)
    return cd.forward(w, x, cos.float(), sin.float(), kc, vc, slots, positions)


def feed(w, seqs, slot_of, steps, cap=48, S=5):
    """Feed sequences (T_i, hidden) into their cache rows in the given steps: each step is a list of
    (sequence, number of tokens). Returns each sequence's outputs (T_i, hidden) and the caches."""
    kc, vc = new_cache(w, S, cap)
    done = [0] * len(seqs)
    outs = [[] for _ in seqs]
    for step in steps:
        xs, slots, pos, spans = [], [], [], []
        for i, n in step:
            xs.append(seqs[i][done[i]: done[i] + n])
            slots += [slot_of[i]] * n
            pos += range(done[i], done[i] + n)
            spans.append((i, n))
            done[i] += n
        out = run(w, kc, vc, torch.cat(xs), torch.tensor(slots), torch.tensor(pos))
        for (i, n), o in zip(spans, out.split([n for _, n in spans])):
            outs[i].append(o)
    assert done == [len(s) for s in seqs]
    return [torch.cat(o) for o in outs], kc, vc


CASES = {
    "gqa2": {},
    "mha-bias": {"kvh": 4, "bias": True},
    "gqa4-qknorm": {"H": 8, "kvh": 2, "d": 8, "qk_norm": True},
    "d24-wide": {"hid": 64, "H": 3, "kvh": 1, "d": 24, "inter": 176, "L": 3},
}


@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(case):
    """Ragged prefill chunks, tool-response-like chunks and one-token decodes mixed in steps, against
    the whole-sequence float64 forward. Shapes: biases, Qwen3 q/k norms, hidden / head_dim / inter
    sizes that are not multiples of the 16-float vectors, a lone token in a step."""
    w = make(**CASES[case])
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randn(T, w.hidden, generator=g) for T in (9, 3, 14)]
    steps = [[(0, 4), (1, 1), (2, 6)], [(0, 1), (1, 1), (2, 1)], [(2, 5)], [(0, 4), (1, 1), (2, 1)], [(2, 1)]]
    outs, _, _ = feed(w, seqs, [3, 0, 4], steps)
    for x, got in zip(seqs, outs):
        torch.testing.assert_close(got.double(), reference(w, x), atol=2e-5, rtol=2e-5)


def test_a_token_does_not_depend_on_its_batch_chunking_or_threads(two_threads):
    """Bit for bit: a sequence fed in one prefill, token by token alone, or in odd chunks next to other
    sequences, on 1 or 2 threads, gives the same outputs and the same cache entries."""
    w = make(hid=64, H=4, kvh=2, d=32, inter=176, L=2)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randn(T, w.hidden, generator=g) for T in (40, 33, 7)]
    runs = {
        "one prefill": [[(0, 40)]],
        "token by token": [[(0, 1)]] * 40,
        "mixed": ([[(0, 3), (1, 20), (2, 7)], [(0, 17), (1, 1)]] + [[(0, 1), (1, 1)]] * 12
                  + [[(0, 8)]]),
    }
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, steps in runs.items():
            used = sorted({i for s in steps for i, _ in s})
            outs, kc, vc = feed(w, [seqs[i] for i in used], [2, 0, 4][: len(used)], [
                [(used.index(i), n) for i, n in s] for s in steps])
            results[name, threads] = outs[0], kc[:, 2], vc[:, 2]
    first = results["one prefill", 1]
    for key, got in results.items():
        for a, b in zip(first, got):
            assert torch.equal(a, b), key


def test_matmuls_are_torchs_bit_for_bit():
    """The GEMMs are torch's own calls. Inputs of +-1 and +-2 make the norm's sum of squares exact in
    any order, so the C norm equals torch's bit for bit; then the values written to the cache (v is
    not rotated) must be torch.addmm's on the same rows, bit for bit, on any batch size (a lone token
    included): padded, as the C side pads, to a multiple of ROW_ALIGN rows."""
    w = make(hid=64, H=4, kvh=2, d=16, inter=64, L=1, bias=True)
    lw = w.tensors[0][0]
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 7, 40):
        x = (torch.randint(1, 3, (n, 64), generator=g) * (torch.randint(0, 2, (n, 64), generator=g) * 2 - 1)).float()
        kc, vc = new_cache(w, 1, 48)
        pos = torch.arange(n)
        run(w, kc, vc, x, torch.zeros(n, dtype=torch.int64), pos)
        xn = torch.nn.functional.rms_norm(x, (64,), lw.input_norm, w.eps)
        rows = torch.arange(-(-n // ROW_ALIGN) * ROW_ALIGN) % n  # tokens 0, 1, ... repeated, as the C side
        want = torch.addmm(lw.qkv_bias, xn[rows], lw.qkv)[:n, 6 * 16:].reshape(n, 2, 16)
        assert torch.equal(vc[0, 0, :, :n].transpose(0, 1), want), n


def test_bad_input_names_the_field_and_writes_nothing():
    w = make()
    kc, vc = new_cache(w, 3, 16)
    k0, v0 = kc.clone(), vc.clone()
    x = torch.randn(3, w.hidden)
    with pytest.raises(ValueError, match=r"token 2: slot 3 / position 0 out of range \(cache rows 3"):
        run(w, kc, vc, x, torch.tensor([0, 1, 3]), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="token 1: slot 1 / position 16 out of range"):
        run(w, kc, vc, x, torch.tensor([0, 1, 2]), torch.tensor([0, 16, 0]))
    assert torch.equal(kc, k0) and torch.equal(vc, v0)
    with pytest.raises(ValueError, match=r"x must be a contiguous float32 CPU tensor of shape \(3, 40\)"):
        run(w, kc, vc, x.double(), torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="v_cache must be"):
        cd.forward(w, x, *[t.float() for t in tables(torch.zeros(3), 16)], kc, vc[..., :8], torch.tensor([0, 1, 2]),
                   torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match=r"slots and positions must be \(3,\)"):
        run(w, kc, vc, x, torch.tensor([0, 1]), torch.tensor([0, 0, 0]))
    layers, final = w.tensors
    bad = layers[0]._replace(k_norm=torch.ones(16))
    with pytest.raises(ValueError, match=r"layers\[0\].q_norm is required"):
        cd.DecoderWeights([bad], final, num_heads=4, num_kv_heads=2, eps=1e-6)
    bad = layers[0]._replace(down=layers[0].down.t())
    with pytest.raises(ValueError, match=r"layers\[0\].down must be a contiguous"):
        cd.DecoderWeights([bad], final, num_heads=4, num_kv_heads=2, eps=1e-6)
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"):
        cd.DecoderWeights(list(layers), final, num_heads=4, num_kv_heads=3, eps=1e-6)


def test_switched_off_it_says_why():
    code = "from sailor_engine.kernels import cpu_decoder as cd; print(cd.available(), cd.status())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SAILOR_ENGINE_NATIVE": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("False unavailable: disabled by SAILOR_ENGINE_NATIVE=0")
