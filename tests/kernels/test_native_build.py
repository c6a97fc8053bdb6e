"""The C kernels build for the architecture's baseline too, not only for -march=native, and compute
the same bits there.

native.py builds with -march=native, so a kernel that only compiles for the build machine's vector
unit (an asm operand naming one AVX-512 register, say) would take every C kernel away, decoder and
sampler included, on the first machine without it. Here the sources are built for plain x86-64 (SSE2:
a 16-float vector is four registers) or armv8-a, and their results compared bit for bit with the
native build's: every sum in them has a fixed order over fixed 16-lane vectors, whatever registers
hold them."""

import ctypes
import math
import platform
import shutil
import subprocess

import pytest
import torch

from sailor_engine.kernels import cpu_attention, cpu_flash, cpu_sample, native

BASELINE = {"x86_64": "x86-64", "aarch64": "armv8-a"}.get(platform.machine())
CC = shutil.which("cc") or shutil.which("gcc")

pytestmark = pytest.mark.skipif(BASELINE is None or CC is None or native.load() is None,
                                reason="needs x86_64 or aarch64, a C compiler and the native build")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> ctypes.CDLL:
    out = tmp_path_factory.mktemp("baseline") / "sailor-native-baseline.so"
    flags = [f for f in native.FLAGS if not f.startswith("-march")] + [f"-march={BASELINE}", "-Wno-psabi"]
    sources = [str(p) for p in native._sources() if p.suffix == ".c"]
    r = subprocess.run([CC, *flags, "-fopenmp", "-o", str(out), *sources, "-lm"], capture_output=True, text=True)
    if r.returncode:  # without OpenMP, as native.py falls back
        r = subprocess.run([CC, *flags, "-o", str(out), *sources, "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    lib = ctypes.CDLL(str(out))
    for name, args in native.SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int64, args
    return lib


def test_sampling_is_bit_for_bit_the_native_builds(baseline):
    R, V = 24, 1211
    z = torch.randn(R, V, generator=torch.Generator().manual_seed(0)) * 4
    temp = torch.tensor([0.0, 1.0, 0.7] * 8)
    u = torch.rand(R, generator=torch.Generator().manual_seed(1))
    want = cpu_sample.sample(z, temp, u)
    tokens, logps = torch.empty(R, dtype=torch.int64), torch.empty(R)
    assert baseline.se_sample(z.data_ptr(), R, V, V, temp.data_ptr(), u.data_ptr(), tokens.data_ptr(),
                              logps.data_ptr(), 1) == 0
    assert torch.equal(tokens, want[0]) and torch.equal(logps, want[1])


def test_cached_attention_is_bit_for_bit_the_native_builds(baseline):
    g = torch.Generator().manual_seed(2)
    S, kvh, H, d, cap, n = 3, 2, 4, 32, 64, 5
    kc, vc = torch.randn(S, kvh, d, cap, generator=g), torch.randn(S, kvh, cap, d, generator=g)
    q = torch.randn(n, H, d, generator=g)
    slots, nvis = torch.tensor([0, 2, 1, 2, 0]), torch.tensor([1, 17, 64, 40, 33])
    want = cpu_attention.cached_attention(q, kc, vc, slots, nvis)
    out = torch.empty(n, H, d)
    assert baseline.se_attend(q.data_ptr(), H * d, kc.data_ptr(), vc.data_ptr(), slots.data_ptr(), nvis.data_ptr(),
                              n, H, kvh, d, S, cap, out.data_ptr(), 1) == 0
    assert torch.equal(out, want)


def test_training_attention_is_bit_for_bit_the_native_builds(baseline):
    g = torch.Generator().manual_seed(3)
    lens, H, kvh, d = [70, 1, 33], 4, 2, 32
    N = sum(lens)
    cu = torch.tensor([0, *lens]).cumsum(0)
    q, k, v = torch.randn(N, H, d, generator=g), torch.randn(N, kvh, d, generator=g), torch.randn(N, kvh, d, generator=g)
    want = cpu_flash.flash_varlen(q, k, v, cu)
    o, lse = torch.empty(N, H, d), torch.empty(N, H)
    assert baseline.se_flash_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), cu.data_ptr(), len(lens), N, H, kvh, d,
                                 o.data_ptr(), lse.data_ptr(), 0, 1) == 0
    assert torch.equal(o, want) and math.isfinite(float(lse.sum()))
