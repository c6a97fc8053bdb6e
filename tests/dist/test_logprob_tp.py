"""Vocab-parallel fused_linear_logprob over 2 gloo ranks matches the single-process forward and grads."""

from pathlib import Path

import pytest


@pytest.mark.dist
def test_vocab_parallel_matches_single_process(run_workers):
    assert "all cases match" in run_workers(Path(__file__).with_name("logprob_tp_worker.py"))
