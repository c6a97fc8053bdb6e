"""Pipeline parallelism: the stage partition, stages chained in one process, input checks, and under
torchrun (gloo) pp=2 1F1B, pp=2 x dp=2 with FSDP2 stages, and pipelined decode, against the
single-process model and Generator."""

import itertools
import random
from pathlib import Path

import pytest
import torch

from sailor_engine.model import ModelConfig, Transformer
from sailor_engine.parallel.pipeline import MicroBatch, PipelineStage, balanced_partition, stage_layers

CFG = ModelConfig(family="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                  num_kv_heads=2, qkv_bias=True)


def brute_force(costs, pp, first, last):
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), pp - 1):
        b = (0, *cuts, len(costs))
        loads = [sum(costs[x:y]) for x, y in zip(b, b[1:])]
        loads[0] += first
        loads[-1] += last
        best = max(loads) if best is None else min(best, max(loads))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_partition_is_optimal_and_contiguous(seed):
    rng = random.Random(seed)
    L = rng.randint(1, 9)
    pp = rng.randint(1, L)
    costs = [rng.randint(1, 50) for _ in range(L)]
    first, last = rng.randint(0, 80), rng.randint(0, 80)
    ranges = balanced_partition(costs, pp, first_extra=first, last_extra=last)
    assert len(ranges) == pp and all(len(r) >= 1 for r in ranges)
    assert [i for r in ranges for i in r] == list(range(L))
    loads = [sum(costs[i] for i in r) for r in ranges]
    loads[0] += first
    loads[-1] += last
    assert max(loads) == brute_force(costs, pp, first, last)


def test_stage_layers_count_embedding_and_head():
    assert stage_layers(CFG, 1) == [range(0, 4)]
    assert stage_layers(CFG, 2) == [range(0, 2), range(2, 4)]
    # A vocab far larger than a layer: the embedding and head stages get the fewest layers.
    big = ModelConfig(vocab_size=4000, hidden_size=32, intermediate_size=64, num_layers=8, num_heads=4, num_kv_heads=4)
    r = stage_layers(big, 3)
    assert len(r[1]) > len(r[0]) and len(r[1]) > len(r[2])
    with pytest.raises(ValueError, match="cannot split 4 layers into 5 pipeline stages"):
        stage_layers(CFG, 5)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("split", [(2, 4), (1, 3, 4)])
def test_stages_chained_in_process_equal_the_model(tied, split):
    import msgspec

    cfg = msgspec.structs.replace(CFG, tie_word_embeddings=tied)
    model = Transformer(cfg).init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    bounds = (0, *split)
    stages = [PipelineStage(model, range(a, b), i, len(split)) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    ids = torch.randint(0, cfg.vocab_size, (17,), generator=torch.Generator().manual_seed(1))
    mb = MicroBatch.packed(ids, torch.tensor([0, 5, 6, 17]))
    with torch.no_grad():
        x = ids
        for s in stages:
            x = s(x, mb.cu_seqlens, mb.positions)
        want = model.forward_packed(ids, mb.cu_seqlens)
    torch.testing.assert_close(x, want, atol=0, rtol=0)  # the same ops in the same order
    torch.testing.assert_close(stages[-1].output_weight, model.output_weight, atol=0, rtol=0)
    assert stages[-1].tied_copy == tied and (stages[-1].output_weight is model.output_weight) != tied
    names = {n for s in stages for n, _ in s.named_parameters()}
    assert names - {"lm_head.weight"} <= {n for n, _ in model.named_parameters()}
    with pytest.raises(RuntimeError, match="stage 0 of .* holds no LM head"):
        stages[0].output_weight


def test_bad_inputs_name_the_sizes():
    model = Transformer(CFG)
    ids = torch.arange(6)
    with pytest.raises(ValueError, match=r"cu_seqlens must be .* from 0 to N = 6; got shape \(3,\) \[0, 2, 5\]"):
        MicroBatch.packed(ids, torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="cu_seqlens must be .* integers"):
        MicroBatch.packed(ids, torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match=r"positions must be \(N,\) = \(6,\), got \(5,\)"):
        MicroBatch.packed(ids, torch.tensor([0, 6]), torch.arange(5))
    with pytest.raises(ValueError, match=r"input_ids must be a non-empty 1-D integer tensor \(N,\), got \(0,\)"):
        MicroBatch.packed(torch.empty(0, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="pp_rank 2 outside pp = 2"):
        PipelineStage(model, range(0, 2), 2, 2)
    with pytest.raises(ValueError, match=r"stage layers range\(3, 5\) must be a non-empty contiguous part of 0..3"):
        PipelineStage(model, range(3, 5), 1, 2)


@pytest.mark.dist
def test_pp2_one_f_one_b_matches_single_process(run_workers):
    out = run_workers(Path(__file__).with_name("pp_worker.py"))
    assert "pp matches single process" in out, out


@pytest.mark.dist
def test_pp2_dp2_fsdp_matches_single_process(run_workers):
    out = run_workers(Path(__file__).with_name("pp_dp_worker.py"), nproc=4)
    assert "pp x dp matches single process" in out, out


@pytest.mark.dist
def test_pipelined_decode_matches_the_generator(run_workers):
    out = run_workers(Path(__file__).with_name("pp_decode_worker.py"))
    assert "pipelined decode matches the generator" in out, out
