"""Tensor-parallel decoder: tp=2 under torchrun equals the single-process model; layouts that cannot
be split are refused with the sizes named."""

from pathlib import Path

import pytest

from sailor_engine.model import ModelConfig
from sailor_engine.model.parallelize import check_tp_layout


@pytest.mark.dist
def test_tp2_forward_loss_grads_generation_and_sharded_load(run_workers):
    out = run_workers(Path(__file__).with_name("tp_model_worker.py"))
    assert "tp model matches single process" in out, out


@pytest.mark.parametrize("fields,tp,msg", [
    ({"num_heads": 6, "num_kv_heads": 6, "hidden_size": 96}, 4, r"model.num_heads \(6\) is not divisible by the tensor-parallel size \(4\)"),
    ({"num_heads": 12, "num_kv_heads": 3, "hidden_size": 96}, 4, r"model.num_kv_heads \(3\) and the tensor-parallel size \(4\)"),
    ({"intermediate_size": 70}, 4, r"model.intermediate_size \(70\) is not divisible by the tensor-parallel size \(4\)"),
    ({"vocab_size": 101}, 2, r"model.vocab_size \(101\) is not divisible by the tensor-parallel size \(2\)"),
])
def test_unsplittable_layouts_name_the_sizes(fields, tp, msg):
    with pytest.raises(ValueError, match=msg):
        check_tp_layout(ModelConfig(**{"num_heads": 4, "num_kv_heads": 2, **fields}), tp)


@pytest.mark.parametrize("heads,kv,tp", [(4, 2, 2), (4, 1, 2), (8, 2, 8), (8, 8, 4)])
def test_splittable_layouts_pass(heads, kv, tp):
    check_tp_layout(ModelConfig(num_heads=heads, num_kv_heads=kv, hidden_size=64, intermediate_size=64,
                                vocab_size=128), tp)
