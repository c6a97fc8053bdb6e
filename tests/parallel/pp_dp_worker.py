"""torchrun worker (4 ranks, gloo, fp32 and fp64): pp=2 x dp=2, FSDP2 on each stage, equals one process.

Composition check of pipeline.py and data.py: each stage is fully_shard-ed over its dp group
(reshard_after_forward=False, several forwards run before their backwards), 1F1B runs on the pp
group with the dp gradient reduction enabled only for the step's last backward (set_grad_sync),
the loss is normalised by the token count all-reduced over dp, and the tied embedding's two
copies (first and last stage, each an FSDP2 shard) are summed. The dp ranks hold uneven token
counts in the same number of micro-batches. Reference: the whole model on one rank, one forward
over the whole global batch. Prints the worst errors on global rank 0.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from worker_report import report

from sailor_engine.kernels import fused_linear_logprob
from sailor_engine.model import ModelConfig, Transformer
from sailor_engine.parallel.data import data_parallel, rft_loss, set_grad_sync
from sailor_engine.parallel.dims import ParallelDims
from sailor_engine.parallel.pipeline import MicroBatch, PipelineStage, one_f_one_b, stage_layers
from sailor_engine.rl.loss import global_norm
from sailor_engine.train.batching import Sequence, pack

CFG = ModelConfig(family="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                  num_kv_heads=2, qkv_bias=True)
SHARES = [[[5, 9], [3], [4, 4], [8]], [[13, 3, 7], [6], [11, 2, 6], [2, 3]]]  # per dp rank, per micro-batch
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def run_case(cfg, dtype, groups):
    model = Transformer(cfg, dtype=dtype).init_weights(std=0.3, generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    seqs = [[[Sequence(torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist(),
                       (torch.rand(n, generator=g) < 0.7).long().tolist()) for n in mb] for mb in r] for r in SHARES]

    full = pack([s for r in seqs for mb in r for s in mb])
    norm_all = global_norm([full.loss_mask], [full.seq_ids])
    hidden = ref.forward_packed(full.input_ids, full.cu_seqlens)
    rft_loss(fused_linear_logprob(hidden, ref.output_weight, full.targets), full.loss_mask, norm_all).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    stage = PipelineStage(model, stage_layers(cfg, 2)[groups.pp_rank], groups.pp_rank, 2)
    stage = data_parallel(stage, groups.dp, mode="fsdp", reshard_after_forward=False)
    batches = [pack(mb) for mb in seqs[groups.dp_rank]]
    norm = global_norm([b.loss_mask for b in batches], [b.seq_ids for b in batches], dp_group=groups.dp)
    assert norm == norm_all

    def loss_fn(h, i):
        return rft_loss(fused_linear_logprob(h, stage.output_weight, batches[i].targets), batches[i].loss_mask, norm)

    mbs = [MicroBatch.packed(b.input_ids, b.cu_seqlens) for b in batches]
    one_f_one_b(stage, mbs, loss_fn, groups.pp, before_backward=lambda i, last: set_grad_sync(stage, last))
    errs = {}
    for n, p in stage.named_parameters():
        rg = ref_grads["embed_tokens.weight" if (n == "lm_head.weight" and stage.tied_copy) else n]
        errs[n] = float((p.grad.full_tensor() - rg).abs().max() / rg.abs().max())
    return errs


def main() -> int:
    dist.init_process_group("gloo")
    groups = ParallelDims(2, 1, 2).build()
    failures, worst = [], {}
    for dtype in (torch.float32, torch.float64):
        name = str(dtype)[6:]
        errs = run_case(CFG, dtype, groups)
        bad = {k: v for k, v in errs.items() if not v <= TOL[dtype]}
        if bad:
            failures.append(f"{name}: {bad}")
        worst[name] = max(errs.values())
    code = report(failures, worst, label="pp=2 x dp=2 fsdp ", ok_line="pp x dp matches single process")
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
