"""RL loss gradient over 2 gloo DP ranks x uneven micro-batches equals the full-batch gradient (1e-6 rel)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("rl_grad_worker.py")


@pytest.mark.dist
def test_dp_and_micro_batch_gradient_matches_full_batch():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(WORKER)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "all cases match" in proc.stdout
