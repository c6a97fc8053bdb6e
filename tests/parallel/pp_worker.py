"""torchrun worker (2 ranks, gloo, fp32): pp=2 1F1B equals the single-process model on the same batch.

Every rank builds the same tiny model and batch. The reference is the whole model on one rank,
all micro-batches packed into one forward, RFT token-mean loss, one backward. The pipeline splits
the same weights into 2 stages and runs 1F1B over micro-batches of different lengths with the loss
normalised by the global token count. Checked per case: the last stage's summed loss, every
parameter's gradient on the stage that holds it (tied embedding copies included), and that the
stages together hold every parameter exactly once; activations sent in a narrower dtype than the
model's (fp32 wire, fp64 model); and that a bad input on one stage makes every
stage raise instead of hang; in fp32 (max error / max |grad| <= 1e-5) and
fp64 (<= 1e-12). Prints the worst errors on rank 0.
"""

from __future__ import annotations

import copy
import itertools
import sys

import torch
import torch.distributed as dist

from sailor_engine.kernels import fused_linear_logprob
from sailor_engine.model import ModelConfig, Transformer
from sailor_engine.parallel.data import rft_loss
from sailor_engine.parallel.dims import ParallelDims
from sailor_engine.parallel.pipeline import MicroBatch, PipelineStage, one_f_one_b, pipelined_decode, stage_layers
from sailor_engine.rl.loss import global_norm
from sailor_engine.train.batching import Sequence, pack

TIED = ModelConfig(family="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                   num_kv_heads=2, qkv_bias=True)
UNTIED = ModelConfig(family="qwen3", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                     num_kv_heads=4, head_dim=8, qk_norm=True, tie_word_embeddings=False)
# sequence lengths (tokens) of each micro-batch: packed sizes 12, 20, 5, 16, 9 - all different
LENGTHS = [[5, 9], [13, 3, 7], [6], [11, 2, 6], [10]]
CASES = [  # (name, cfg, partition or None for stage_layers, micro-batch lengths)
    ("tied, balanced, 5 mbs", TIED, None, LENGTHS),
    ("untied, layers 1|2, 5 mbs", UNTIED, [range(0, 1), range(1, 3)], LENGTHS),
    ("tied, 1 mb (fewer than stages)", TIED, None, LENGTHS[1:2]),
]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # fp64: the schedule is exact, fp32 differs by rounding only


def make_batches(cfg, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for mb in lengths:
        seqs = []
        for n in mb:
            ids = torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
            mask = (torch.rand(n, generator=g) < 0.7).long().tolist()  # ~30% tool tokens, out of the loss
            seqs.append(Sequence(ids, mask))
        out.append(seqs)
    return out


def run_case(cfg, partition, lengths, dtype, groups, wire=None):
    model = Transformer(cfg, dtype=dtype).init_weights(std=0.3, generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    seqs = make_batches(cfg, lengths, seed=2)
    batches = [pack(s) for s in seqs]
    norm = global_norm([b.loss_mask for b in batches], [b.seq_ids for b in batches])

    full = pack([s for mb in seqs for s in mb])  # reference: one forward over the whole batch
    hidden = ref.forward_packed(full.input_ids, full.cu_seqlens)
    ref_loss = rft_loss(fused_linear_logprob(hidden, ref.output_weight, full.targets), full.loss_mask, norm)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    ranges = partition or stage_layers(cfg, 2)
    stage = PipelineStage(model, ranges[groups.pp_rank], groups.pp_rank, 2)
    mbs = [MicroBatch.packed(b.input_ids, b.cu_seqlens) for b in batches]

    def loss_fn(h, i):
        logp = fused_linear_logprob(h, stage.output_weight, batches[i].targets)
        return rft_loss(logp, batches[i].loss_mask, norm)

    # every rank has the data: checked against stage 0's
    loss = one_f_one_b(stage, mbs, loss_fn, groups.pp, act_dtype=wire)

    errs, names = {}, []
    if stage.is_last:
        errs["loss"] = abs(float(loss) - float(ref_loss.detach())) / abs(float(ref_loss.detach()))
    for n, p in stage.named_parameters():
        rn = "embed_tokens.weight" if (n == "lm_head.weight" and stage.tied_copy) else n
        names.append(rn)
        errs[n] = float((p.grad - ref_grads[rn]).abs().max() / ref_grads[rn].abs().max().clamp(min=1e-30))
    every = [None, None]
    dist.all_gather_object(every, names)
    held = sorted(n for ns in every for n in ns)
    want = sorted(ref_grads)
    if cfg.tie_word_embeddings:
        want = sorted(want + ["embed_tokens.weight"])  # held by both the first and the last stage
    assert held == want, f"stages hold {held}, the model has {want}"
    return errs


def expect_error(fn, want):
    """fn() must raise ValueError whose message contains want (a substring for this rank)."""
    try:
        fn()
    except ValueError as e:
        assert want in str(e), (want, str(e))
    else:
        raise AssertionError(f"expected ValueError containing {want!r}")


def check_bad_inputs_raise_everywhere(groups):
    """A bad input on one stage makes every stage raise (no stage left hanging in a p2p call)."""
    model = Transformer(TIED).init_weights(std=0.3, generator=torch.Generator().manual_seed(1))
    me = groups.pp_rank
    stage = PipelineStage(model, stage_layers(TIED, 2)[me], me, 2)
    batches = [pack(s) for s in make_batches(TIED, LENGTHS[:3], seed=3)]
    mbs = [MicroBatch.packed(b.input_ids, b.cu_seqlens) for b in batches]
    loss_fn = lambda h, i: h.sum()  # noqa: E731
    other = "another stage rejected this step's inputs"
    bad = mbs[:1] + [MicroBatch(mbs[1].input_ids, mbs[1].cu_seqlens, mbs[1].positions[:-1])]
    expect_error(lambda: one_f_one_b(stage, bad if me == 0 else None, loss_fn, groups.pp),
                 "micro-batch 1: positions must be (N,)" if me == 0 else "the first stage rejected")
    expect_error(lambda: one_f_one_b(stage, mbs if me == 0 else None, loss_fn if me == 0 else None, groups.pp),
                 other if me == 0 else "the last stage (1) needs a loss_fn")
    expect_error(lambda: one_f_one_b(stage, mbs if me == 0 else mbs[:2], loss_fn, groups.pp),
                 other if me == 0 else "its micro-batches ([12, 20] tokens) differ from the first stage's "
                                       "([12, 20, 5] tokens)")
    expect_error(lambda: pipelined_decode(stage, [[1, 2], []] if me == 0 else None, groups.pp, max_new_tokens=3,
                                          num_groups=2),
                 "lengths [2, 0]" if me == 0 else "the first stage rejected the prompts")
    assert all(p.grad is None for p in stage.parameters())  # nothing ran


def main() -> int:
    dist.init_process_group("gloo")
    groups = ParallelDims(1, 1, 2).build()
    failures, worst = [], {}
    for (case, cfg, partition, lengths), dtype in itertools.product(CASES, (torch.float32, torch.float64)):
        name = f"{case}, {str(dtype)[6:]}"
        errs = run_case(cfg, partition, lengths, dtype, groups)
        bad = {k: v for k, v in errs.items() if not v <= TOL[dtype]}
        if bad:
            failures.append(f"{name}: {bad}")
        worst[name] = max(errs.values())
    # fp64 model, fp32 on the wire: the casts at both ends of every p2p (one fp32 rounding per boundary)
    name = "tied, float64 model, float32 wire"
    errs = run_case(TIED, None, LENGTHS, torch.float64, groups, wire=torch.float32)
    if not max(errs.values()) <= TOL[torch.float32]:
        failures.append(f"{name}: {errs}")
    worst[name] = max(errs.values())
    check_bad_inputs_raise_everywhere(groups)
    everything = [None, None]
    dist.all_gather_object(everything, (failures, worst))
    if dist.get_rank() == 0:
        for fs, _ in everything:
            for f in fs:
                print("MISMATCH", f)
        if not any(fs for fs, _ in everything):
            for name in worst:
                print(f"{name}: max rel err {max(w[name] for _, w in everything):.1e}")
            print("pp matches single process")
    dist.destroy_process_group()
    return 1 if any(fs for fs, _ in everything) else 0


if __name__ == "__main__":
    sys.exit(main())
