"""RL loss gradient over 2 gloo DP ranks x uneven micro-batches equals the full-batch gradient (1e-6 rel)."""

from pathlib import Path

import pytest


@pytest.mark.dist
def test_dp_and_micro_batch_gradient_matches_full_batch(run_workers):
    assert "all cases match" in run_workers(Path(__file__).with_name("rl_grad_worker.py"))
