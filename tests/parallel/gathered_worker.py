"""torchrun worker (2 ranks, gloo): `gathered` lets FSDP2-sharded ranks generate independently.

Inside `gathered(stage)` every parameter is a whole plain tensor equal to the unsharded model's, and
the ranks then run different numbers of forwards (rank 0 five decode steps, rank 1 two; the
Generator on different prompts), through the module path (FSDP2's forward hooks fire) and the
Generator's FusedWeights path, under inference_mode: a collective inside would hang here. Each
output equals the unsharded reference model's bit for bit. After the context the layout is
data_parallel's again: a training forward leaves the layers sharded and the root gathered, and its
loss and gradients equal the reference's (fp32, 1e-6).
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from worker_report import report

from sailor_engine.kernels import fused_linear_logprob
from sailor_engine.model import ModelConfig, Transformer
from sailor_engine.parallel.data import data_parallel, gathered
from sailor_engine.parallel.dims import ParallelDims
from sailor_engine.parallel.pipeline import MicroBatch, PipelineStage
from sailor_engine.rollout.generator import Generator, SamplingParams

CFG = ModelConfig(family="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, qkv_bias=True)


def decode(model: Transformer, steps: int) -> list[torch.Tensor]:
    """Prefill 3 prompts, then `steps` one-token decode steps, through the modules (forward_cached)."""
    cache = model.new_kv_cache(3, 64)
    ids = torch.arange(1, 13) % CFG.vocab_size
    cu, slots = torch.tensor([0, 4, 9, 12]), torch.arange(3)
    outs = [model.forward_cached(ids, cu, cache, slots)[cu[1:] - 1]]  # the last position of each prompt
    for _ in range(steps):
        outs.append(model.forward_cached(model.logits(outs[-1]).argmax(-1), torch.arange(4), cache, slots))
    return outs


def main() -> int:
    dist.init_process_group("gloo")
    groups = ParallelDims(2, 1, 1).build()
    rank = groups.dp_rank
    model = Transformer(CFG).init_weights(std=0.3, generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    stage = data_parallel(PipelineStage(model, range(CFG.num_layers), 0, 1), groups.dp, mode="fsdp")
    failures, worst = [], {}
    steps = 5 if rank == 0 else 2
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]] if rank == 0 else [[11, 12]]
    params = SamplingParams(temperature=1.0, max_new_tokens=6 if rank == 0 else 3, seed=rank)

    with gathered(stage):
        named = dict(model.named_parameters())
        for n, p in ref.named_parameters():
            if type(named[n].data) is not torch.Tensor or not torch.equal(named[n], p):
                failures.append(f"rank {rank}: {n} is not the whole parameter inside gathered")
        with torch.inference_mode():
            for i, (a, b) in enumerate(zip(decode(model, steps), decode(ref, steps))):
                if not torch.equal(a, b):
                    failures.append(f"rank {rank}: module-path forward {i} differs from the reference")
        got = Generator(model, max_batch=4, max_seq_len=64).generate(prompts, params)
        want = Generator(ref, max_batch=4, max_seq_len=64).generate(prompts, params)
        if [c.token_ids for c in got] != [c.token_ids for c in want] or \
                [c.logprobs for c in got] != [c.logprobs for c in want]:
            failures.append(f"rank {rank}: Generator differs from the reference")

    if not all(isinstance(p, DTensor) for p in model.parameters()):
        failures.append(f"rank {rank}: parameters are not sharded again after gathered")
    ids = torch.arange(3, 20) % CFG.vocab_size
    mb = MicroBatch.packed(ids[:-1], torch.tensor([0, 7, 16]))
    h = stage(mb.input_ids, mb.cu_seqlens, mb.positions)
    if not isinstance(model.layers[0].self_attn.q_proj.weight, DTensor):
        failures.append(f"rank {rank}: a layer did not reshard after the training forward")
    if isinstance(model.embed_tokens.weight, DTensor):
        failures.append(f"rank {rank}: the root resharded after forward (the LM head must stay gathered)")
    fused_linear_logprob(h, stage.output_weight, ids[1:]).sum().backward()
    h_ref = ref.forward_packed(mb.input_ids, mb.cu_seqlens)
    fused_linear_logprob(h_ref, ref.output_weight, ids[1:]).sum().backward()
    # every rank ran the same micro-batch: the summed gradient is twice the reference's
    ref_named = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        g = p.grad.full_tensor()
        err = float((g - 2 * ref_named[n].grad).norm() / (2 * ref_named[n].grad).norm())
        worst[n] = err
        if not err <= 1e-6:
            failures.append(f"rank {rank}: gradient of {n} off by {err:.1e} after gathered")
    code = report(failures, {"grad": max(worst.values())}, label="after gathered: ", ok_line="gathered ok")
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
