"""`run_workers` fixture: launch a worker script under torchrun (gloo on CPU), return its stdout, fail with its output."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run(script: Path, nproc: int = 2, timeout: float = 300) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture
def run_workers():
    return _run
