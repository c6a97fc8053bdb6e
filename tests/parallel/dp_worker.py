"""torchrun worker (2 ranks, gloo, fp32): dp=2 equals one process on the concatenated batch.

Every rank builds the same tiny model and global batch, then trains on its own uneven share with
gradient accumulation (DDP: rank 0 runs 2 micro-batches of 17 tokens, rank 1 3 of 36; FSDP2, which
gathers in every forward, needs equal counts: 3 micro-batches of 21 and 36 tokens), the
RFT token-mean loss normalised by the token count all-reduced over dp before any backward, and
the dp reduction summing (DDP comm hook / FSDP2 divide factor 1). The reference is the whole model
on one rank, one forward over all sequences. Checked for DDP and FSDP2, tied and untied: the loss
(summed over ranks) and every parameter's full gradient, relative error <= 1e-6 in fp32 and
<= 1e-12 in fp64 (the algorithm is exact; fp32 differs by summation order only).
"""

from __future__ import annotations

import copy
import itertools
import sys

import torch
import torch.distributed as dist
from worker_report import report

from sailor_engine.kernels import fused_linear_logprob
from sailor_engine.model import ModelConfig, Transformer
from sailor_engine.parallel.data import check_micro_batches, data_parallel, grad_sync, rft_loss, set_grad_sync, unwrap
from sailor_engine.parallel.dims import ParallelDims
from sailor_engine.parallel.pipeline import MicroBatch, PipelineStage
from sailor_engine.rl.loss import global_norm
from sailor_engine.train.batching import Sequence, pack

TIED = ModelConfig(family="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, qkv_bias=True)
UNTIED = ModelConfig(family="qwen3", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                     num_kv_heads=4, head_dim=8, qk_norm=True, tie_word_embeddings=False)
# per mode, per rank: micro-batches of sequence lengths
SHARES = {"ddp": [[[5, 9], [3]], [[13, 3, 7], [6], [11, 2, 6]]],
          "fsdp": [[[5, 9], [3], [4]], [[13, 3, 7], [6], [11, 2, 6]]]}
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}  # fp64: the algorithm is exact, fp32 differs by rounding only


def make_seqs(cfg, shares, g):
    out = []
    for rank in shares:
        out.append([[Sequence(torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist(),
                              (torch.rand(n, generator=g) < 0.7).long().tolist()) for n in mb] for mb in rank])
    return out


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def run_case(cfg, mode, dtype, dp_group, rank):
    model = Transformer(cfg, dtype=dtype).init_weights(std=0.3, generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    seqs = make_seqs(cfg, SHARES[mode], torch.Generator().manual_seed(2))

    full = pack([s for r in seqs for mb in r for s in mb])
    norm_all = global_norm([full.loss_mask], [full.seq_ids])
    hidden = ref.forward_packed(full.input_ids, full.cu_seqlens)
    ref_loss = rft_loss(fused_linear_logprob(hidden, ref.output_weight, full.targets), full.loss_mask, norm_all)
    ref_loss.backward()

    dp = data_parallel(PipelineStage(model, range(cfg.num_layers), 0, 1), dp_group, mode=mode)
    if mode == "ddp":
        try:
            set_grad_sync(dp, False)
        except ValueError as e:
            assert "use parallel.data_parallel = 'fsdp'" in str(e)
        else:
            raise AssertionError("set_grad_sync must refuse DDP")
    batches = [pack(mb) for mb in seqs[rank]]
    if mode == "fsdp":
        check_micro_batches(len(batches), dp_group)
        try:
            check_micro_batches(len(SHARES["ddp"][rank]), dp_group)
        except ValueError as e:
            assert "different numbers of micro-batches [2, 3]" in str(e), e
        else:
            raise AssertionError("check_micro_batches must refuse 2 vs 3")
    norm = global_norm([b.loss_mask for b in batches], [b.seq_ids for b in batches], dp_group=dp_group)
    assert norm == norm_all, (norm, norm_all)
    loss = torch.zeros((), dtype=torch.float64)
    for i, b in enumerate(batches):
        with grad_sync(dp, i == len(batches) - 1):
            mb = MicroBatch.packed(b.input_ids, b.cu_seqlens)
            h = dp(mb.input_ids, mb.cu_seqlens, mb.positions)
            part = rft_loss(fused_linear_logprob(h, unwrap(dp).output_weight, b.targets), b.loss_mask, norm)
            part.backward()
            loss += part.detach()
    dist.all_reduce(loss, group=dp_group)
    errs = {"loss": abs(float(loss) - float(ref_loss.detach())) / abs(float(ref_loss.detach()))}
    ref_grads = dict(ref.named_parameters())
    mine = dict(unwrap(dp).named_parameters())
    assert sorted(mine) == sorted(ref_grads), (sorted(mine), sorted(ref_grads))
    for n, p in mine.items():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        errs[n] = rel(g, ref_grads[n].grad)
    return errs


def main() -> int:
    dist.init_process_group("gloo")
    groups = ParallelDims(2, 1, 1).build()
    failures, worst = [], {}
    for mode, (cfg, tag), dtype in itertools.product(("ddp", "fsdp"), ((TIED, "tied"), (UNTIED, "untied")),
                                                     (torch.float32, torch.float64)):
        name = f"{mode} {tag} {str(dtype)[6:]}"
        errs = run_case(cfg, mode, dtype, groups.dp, groups.dp_rank)
        bad = {k: v for k, v in errs.items() if not v <= TOL[dtype]}
        if bad:
            failures.append(f"{name}: {bad}")
        worst[name] = max(errs.values())
    code = report(failures, worst, label="", ok_line="dp matches single process")
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
