"""torchrun worker: sharded checkpoints round-trip across tp layouts and export to transformers.

Launched by tests/parallel/test_checkpoint.py (2 gloo ranks, fp32). For a Qwen3 config with one kv
head (replicated over both ranks, untied) and a tied Qwen2 config: save at tp=2 and load into a
tp=1 model, save at tp=1 and load into a tp=2 model, tp=2 into tp=2; each load must reproduce the
reference parameters bit for bit (every rank its own slices). Then rank 0 exports the tp=2
checkpoint to an HF directory, loads it in transformers and compares logits with the reference.
Any mismatch raises.
"""

import copy
import tempfile

import torch
import torch.distributed as dist

from sailor_engine.model import ModelConfig, Transformer, load_hf
from sailor_engine.model.parallelize import parallelize_tp, shard_plan
from sailor_engine.parallel.checkpoint import export_hf, load_checkpoint, save_checkpoint
from sailor_engine.parallel.dims import ParallelDims

V = 96
CONFIGS = {
    "qwen3-4x1-untied": ModelConfig(family="qwen3", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                                    num_heads=4, num_kv_heads=1, head_dim=16, qk_norm=True, tie_word_embeddings=False),
    "qwen2-4x2-tied": ModelConfig(family="qwen2", vocab_size=V, hidden_size=48, intermediate_size=80, num_layers=2,
                                  num_heads=4, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True),
}


def randomized(cfg, seed):
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.15) + (1.0 if "norm" in name else 0.0))
    return model


def assert_slices_of(tag, model, ref):
    full, plan = dict(ref.named_parameters()), shard_plan(model)
    for name, p in model.named_parameters():
        want = plan[name].take(full[name]) if name in plan else full[name]
        assert torch.equal(p, want), f"{tag}: {name} differs from the reference"


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
    if rank == 0:
        print(f"max err exported logits vs reference: {worst:.3g}")
        print("checkpoints round-trip across layouts")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
