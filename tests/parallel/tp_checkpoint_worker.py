"""torchrun worker: sharded checkpoints round-trip across tp layouts and export to transformers.

Launched by tests/parallel/test_checkpoint.py (2 gloo ranks, fp32). For a Qwen3 config with one kv
head (replicated over both ranks, untied) and a tied Qwen2 config: save at tp=2 and load into a
tp=1 model, save at tp=1 and load into a tp=2 model, tp=2 into tp=2; each load must reproduce the
reference parameters bit for bit (every rank its own slices). Then rank 0 exports the tp=2
checkpoint to an HF directory, loads it in transformers and compares logits with the reference.
Last, resumption with an AdamW optimizer: its state crosses layouts bit for bit, and a run resumed
in its own layout continues exactly as the uninterrupted one.
Any mismatch raises.
"""

import copy
import tempfile

import torch
import torch.distributed as dist

from sailor_engine.kernels.logprob import fused_linear_logprob
from sailor_engine.model import ModelConfig, load_hf
from sailor_engine.model.parallelize import parallelize_tp, shard_plan
from sailor_engine.parallel.checkpoint import export_hf, load_checkpoint, read_manifest, save_checkpoint
from sailor_engine.parallel.dims import ParallelDims
from tp_model_worker import randomized  # this directory: torchrun puts the script's on sys.path

V = 96
CONFIGS = {
    "qwen3-4x1-untied": ModelConfig(family="qwen3", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                                    num_heads=4, num_kv_heads=1, head_dim=16, qk_norm=True, tie_word_embeddings=False),
    "qwen2-4x2-tied": ModelConfig(family="qwen2", vocab_size=V, hidden_size=48, intermediate_size=80, num_layers=2,
                                  num_heads=4, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True),
}


def assert_slices_of(tag, model, ref):
    full, plan = dict(ref.named_parameters()), shard_plan(model)
    for name, p in model.named_parameters():
        want = plan[name].take(full[name]) if name in plan else full[name]
        assert torch.equal(p, want), f"{tag}: {name} differs from the reference"


def train_step(model, opt, seed):
    """One AdamW step on a token-mean fused log-prob loss over a packed batch."""
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 7, 16])
    ids = torch.randint(0, V, (16,), generator=gen)
    targets = torch.randint(0, V, (16,), generator=gen)
    hidden = model.forward_packed(ids, cu)
    loss = -fused_linear_logprob(hidden, model.output_weight, targets, tp_group=model.tp_group).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def adamw(model, lr=1e-2):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def assert_same_state(tag, full_model, full_opt, tp_model, tp_opt):
    """A tp=1 model + optimizer and a tp=2 one hold the very same state: the tp side's parameters,
    Adam moments and step counts are exactly the blocks of the full side's, and lr etc. agree."""
    plan = shard_plan(tp_model)
    full_params = dict(full_model.named_parameters())
    for name, p in tp_model.named_parameters():
        f = full_params[name]
        block = plan[name].take if name in plan else (lambda t: t)
        assert torch.equal(p, block(f)), f"{tag}: parameter {name}"
        fs, ts = full_opt.state[f], tp_opt.state[p]
        assert fs.keys() == ts.keys(), f"{tag}: optimizer state keys of {name}: {fs.keys()} vs {ts.keys()}"
        for k, v in ts.items():
            want = block(fs[k]) if fs[k].shape == f.shape else fs[k]
            assert torch.equal(v, want), f"{tag}: optimizer state {k} of {name}"
    for gf, gt in zip(full_opt.param_groups, tp_opt.param_groups):
        assert {k: v for k, v in gf.items() if k != "params"} == {k: v for k, v in gt.items() if k != "params"}


def check_resume(tag, cfg, groups, root):
    """One AdamW step, save with the optimizer at tp=2 and at tp=1, load each into the other layout:
    parameters and optimizer state arrive bit for bit; resuming in the same layout then continues
    exactly as the uninterrupted run."""
    rank = groups.tp_rank
    ref = randomized(cfg, 70)
    tp_model = parallelize_tp(copy.deepcopy(ref), groups)
    opt_ref, opt_tp = adamw(ref), adamw(tp_model)
    train_step(ref, opt_ref, 1)
    train_step(tp_model, opt_tp, 1)
    d1, d2 = f"{root}/{tag}-opt-tp1", f"{root}/{tag}-opt-tp2"
    save_checkpoint(tp_model, d2, groups, optimizer=opt_tp, extra={"step": 1})
    if rank == 0:
        save_checkpoint(ref, d1, optimizer=opt_ref, extra={"step": 1})
    dist.barrier()
    assert read_manifest(d2)["extra"] == {"step": 1}
    a = randomized(cfg, 71)
    opt_a = adamw(a, lr=5.0)  # the saved lr must win
    load_checkpoint(a, d2, optimizer=opt_a)
    assert_same_state(f"{tag} tp2 -> tp1", a, opt_a, tp_model, opt_tp)
    b = parallelize_tp(randomized(cfg, 72), groups)
    opt_b = adamw(b)
    load_checkpoint(b, d1, optimizer=opt_b)
    assert_same_state(f"{tag} tp1 -> tp2", ref, opt_ref, b, opt_b)
    c = parallelize_tp(randomized(cfg, 73), groups)
    opt_c = adamw(c)
    load_checkpoint(c, d2, optimizer=opt_c)
    train_step(tp_model, opt_tp, 2)
    train_step(c, opt_c, 2)
    for (name, p), q in zip(tp_model.named_parameters(), c.parameters()):
        assert torch.equal(p, q), f"{tag}: resumed run differs from the uninterrupted one at {name}"


def main():
    dist.init_process_group("gloo")
    groups = ParallelDims(dp=1, tp=2, pp=1).build()
    rank = groups.tp_rank
    with tempfile.TemporaryDirectory() as tmp:
        root = [tmp]
        dist.broadcast_object_list(root, src=0)
        root = root[0]
        worst = 0.0
        for i, (tag, cfg) in enumerate(CONFIGS.items()):
            ref = randomized(cfg, 10 + i)
            d1, d2 = f"{root}/{tag}-tp1", f"{root}/{tag}-tp2"
            save_checkpoint(parallelize_tp(copy.deepcopy(ref), groups), d2, groups)
            assert_slices_of(f"{tag} tp2 -> tp1", load_checkpoint(randomized(cfg, 50), d2), ref)
            assert_slices_of(f"{tag} tp2 -> tp2",
                             load_checkpoint(parallelize_tp(randomized(cfg, 51), groups), d2), ref)
            if rank == 0:
                save_checkpoint(ref, d1)  # a single-process save
            dist.barrier()
            assert_slices_of(f"{tag} tp1 -> tp2",
                             load_checkpoint(parallelize_tp(randomized(cfg, 52), groups), d1), ref)
            if rank == 0:
                import transformers

                out = f"{root}/{tag}-hf"
                export_hf(d2, out)
                assert_slices_of(f"{tag} export -> load_hf", load_hf(out), ref)
                hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                       attn_implementation="eager")
                ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(3))
                with torch.no_grad():
                    err = (hf(ids).logits - ref(ids)).abs().max().item()
                assert err <= 1e-5, f"{tag}: exported checkpoint's logits in transformers differ by {err}"
                worst = max(worst, err)
            dist.barrier()
            check_resume(tag, cfg, groups, root)
            dist.barrier()
    if rank == 0:
        print(f"max err exported logits vs reference: {worst:.3g}")
        print("checkpoints round-trip across layouts")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
