"""Test-wide settings: CPU by default; Triton kernels run under the interpreter when there is no GPU;
the `run_workers` fixture for distributed tests.

TRITON_INTERPRET must be set before triton.jit decorates anything, hence here, before any test
module imports sailor_engine.kernels.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _run(script: Path, nproc: int = 2, timeout: float = 300) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture
def run_workers():
    """run_workers(script, nproc=2): launch a worker script under torchrun (gloo), return its stdout."""
    return _run


@pytest.fixture
def two_threads():
    """torch on two intra-op threads for the test (the demo's setting), restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["native", "torch"])
def cpu_path(request, monkeypatch):
    """Run a test on both CPU paths of generation: the C kernels (sailor_engine.kernels: cpu_attention,
    cpu_decoder for FusedWeights, cpu_sample for the Generator's sampling) and the torch ops they
    replace when they cannot be built. Each must hold the test's properties."""
    from sailor_engine.kernels import cpu_attention, cpu_decoder
    from sailor_engine.model import attention, transformer
    from sailor_engine.rollout import generator

    if request.param == "torch":
        monkeypatch.setattr(attention, "NATIVE_CPU_ATTENTION", False)
        monkeypatch.setattr(transformer, "NATIVE_CPU_DECODER", False)
        monkeypatch.setattr(generator, "NATIVE_CPU_SAMPLER", False)
    elif not (cpu_attention.available() and cpu_decoder.available()):
        pytest.skip(f"C kernels: {cpu_decoder.status()}")
    return request.param
