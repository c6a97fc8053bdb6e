"""Tensor-parallel layers and mappings on 2 gloo ranks against megatron-core 0.16.1 (the oracle)."""

from pathlib import Path

import pytest

pytest.importorskip("megatron.core")


@pytest.mark.dist
def test_tp_layers_match_megatron_core(run_workers):
    out = run_workers(Path(__file__).with_name("tp_layers_worker.py"))
    assert "tp layers match megatron-core" in out, out
