"""torchrun worker: the RL loss gradient over 2 DP ranks x uneven micro-batches equals the full batch.

Launched by tests/dist/test_rl_grad.py (`torchrun --nproc-per-node 2 --standalone`, gloo). Every
rank builds the same batch and a tiny policy (logits = features @ W.T), computes the full-batch
gradient alone, then its own uneven share of the sequences in uneven micro-batches with the
counts all-reduced by global_norm, sums the gradients over ranks and compares. Exits 1 on any
mismatch; prints "all cases match" on rank 0 otherwise.
"""

from __future__ import annotations

import itertools
import sys

import torch
import torch.distributed as dist

from sailor_engine.rl.config import AlgoConfig
from sailor_engine.rl.loss import AGG_MODES, global_norm, rl_loss, seq_ids_from_cu_seqlens

B, T, H, V = 8, 9, 5, 13
RANK_SEQS = [[0, 1, 2], [3, 4, 5, 6, 7]]  # uneven DP shares
MICRO = [[1, 2], [2, 1, 2]]  # uneven micro-batches per rank (in sequences)
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def make_data(dtype):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    old = torch.log_softmax(x @ (w + 0.3 * torch.randn(V, H, generator=g, dtype=torch.float64)).T, -1)
    ref = torch.log_softmax(x @ (w + 0.2 * torch.randn(V, H, generator=g, dtype=torch.float64)).T, -1)
    pick = lambda lp: lp.gather(-1, tokens[..., None])[..., 0]  # noqa: E731
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    pos = torch.arange(T)
    mask = (pos >= 1) & (pos < lengths[:, None])
    mask[2, 3:5] = False  # a tool response
    mask[5] = False  # an excluded (V2) trajectory
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return dict(x=cast(x), w=cast(w), tokens=tokens, old=cast(pick(old)), ref=cast(pick(ref)), mask=mask,
                adv=cast(adv), lengths=lengths)


def micro_batch(d, w, seqs, packed):
    """Forward of the policy on sequences `seqs`: padded (b, T) or packed (n,) tensors + seq_ids."""
    logits = d["x"][seqs] @ w.T
    lp_all = torch.log_softmax(logits, -1)
    logp = lp_all.gather(-1, d["tokens"][seqs][..., None])[..., 0]
    entropy = -(lp_all.exp() * lp_all).sum(-1)
    mb = dict(logp=logp, old=d["old"][seqs], ref=d["ref"][seqs], mask=d["mask"][seqs], entropy=entropy,
              adv=d["adv"][seqs], seq_ids=None)
    if packed:
        lengths = d["lengths"][seqs]
        for k in ("logp", "old", "ref", "mask", "entropy"):
            mb[k] = torch.cat([row[:n] for row, n in zip(mb[k], lengths.tolist())])
        mb["seq_ids"] = seq_ids_from_cu_seqlens(torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))
    return mb


def grad_of(d, cfg, micro_seqs, packed, dp_group, grad_reduce="sum"):
    w = d["w"].clone().requires_grad_(True)
    with torch.no_grad():  # the masks (and seq_ids) are known before any forward
        shapes = [micro_batch(d, w, s, packed) for s in micro_seqs]
    norm = global_norm([m["mask"] for m in shapes], [m["seq_ids"] for m in shapes], dp_group=dp_group,
                       grad_reduce=grad_reduce)
    for seqs in micro_seqs:
        mb = micro_batch(d, w, seqs, packed)
        loss, _ = rl_loss(mb["logp"], mb["old"], mb["adv"], mb["mask"], norm, cfg, seq_ids=mb["seq_ids"],
                          ref_logp=mb["ref"], entropy=mb["entropy"])
        loss.backward()
    return w.grad


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "run with --nproc-per-node 2"
    mine = RANK_SEQS[rank]
    offsets = list(itertools.accumulate(MICRO[rank], initial=0))
    my_micro = [mine[a:b] for a, b in zip(offsets, offsets[1:])]
    failures, worst = [], {torch.float32: 0.0, torch.float64: 0.0}
    cases = itertools.product(AGG_MODES, ["token", "sequence"], [False, True], [torch.float32, torch.float64],
                              ["sum", "mean"])
    for mode, level, packed, dtype, reduce in cases:
        cfg = AlgoConfig(preset="custom", loss_agg=mode, norm_length=T, ratio_level=level, kl_coef=0.05,
                         entropy_coef=0.01, dual_clip=3.0)
        d = make_data(dtype)
        full = grad_of(d, cfg, [list(range(B))], packed, None)
        g = grad_of(d, cfg, my_micro, packed, dist.group.WORLD, reduce)
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        if reduce == "mean":
            g = g / world  # what DDP / FSDP do; the loss was scaled by the DP size to compensate
        rel = float((g - full).norm() / full.norm())
        worst[dtype] = max(worst[dtype], rel)
        if not rel <= TOL[dtype]:
            failures.append(f"{mode} {level} packed={packed} {dtype} {reduce}: rel err {rel:.3e}")
    flag = torch.tensor([len(failures)])
    dist.all_reduce(flag)
    for f in failures:
        print(f"rank {rank} MISMATCH {f}", flush=True)
    if rank == 0 and int(flag) == 0:
        print(f"all cases match (max rel err fp32 {worst[torch.float32]:.1e}, fp64 {worst[torch.float64]:.1e})",
              flush=True)
    dist.destroy_process_group()
    return 1 if int(flag) else 0


if __name__ == "__main__":
    sys.exit(main())
