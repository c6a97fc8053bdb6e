"""torchrun worker: the tp=2 decoder equals the single-process one (forward, loss, every grad, generation).

Launched by tests/parallel/test_tp_model.py (2 gloo ranks, fp32). For each config (Qwen2 with q/k/v
bias and tied embeddings; Qwen3 with q/k norms and one kv head, replicated over both ranks; Llama
with every bias, untied) every rank builds the same full model from one seed, keeps it as the
reference and shards a copy with parallelize_tp. Then:
- padded forward: logits and the grads of a random linear loss of them;
- packed forward: hidden states, the fused vocab-parallel log-prob, and every grad of its loss;
- greedy generation with the Generator on the sharded model: the same tokens as single-process;
- a deep copy of the sharded model (a reference policy) shares the group and computes the same;
- the same padded and packed checks with sequence parallelism switched on, then generation with it off;
- load_hf_tp from a save_hf directory: every rank's parameters equal its slices of the full ones.
Each parameter's grad is compared with its block of the full model's grad; replicated ones must also
be bit-identical across ranks. Any mismatch raises.
"""

import copy
import math
import sys
import tempfile

import torch
import torch.distributed as dist

from sailor_engine.kernels.logprob import fused_linear_logprob
from sailor_engine.model import ModelConfig, Transformer, hf, save_hf
from sailor_engine.model.parallelize import load_hf_tp, parallelize_tp, set_sequence_parallel, shard_plan
from sailor_engine.parallel.dims import ParallelDims
from sailor_engine.rollout.generator import Generator, SamplingParams

ATOL = 1e-5
V = 96
CONFIGS = {
    "qwen2-4x2-tied": ModelConfig(family="qwen2", vocab_size=V, hidden_size=48, intermediate_size=80, num_layers=2,
                                  num_heads=4, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True),
    "qwen3-4x1-untied": ModelConfig(family="qwen3", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                                    num_heads=4, num_kv_heads=1, head_dim=16, qk_norm=True, tie_word_embeddings=False),
    "llama-2x2-biases": ModelConfig(family="llama", vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2,
                                    num_heads=2, num_kv_heads=2, qkv_bias=True, o_bias=True, mlp_bias=True,
                                    tie_word_embeddings=False),
}
worst: dict[str, float] = {}


def close(name, a, b, atol=ATOL):
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    worst[name] = max(worst.get(name, 0.0), err)
    assert a.shape == b.shape and err <= atol, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}, max err {err}"


def randomized(cfg, seed):
    """Weights far from the default init, so every term (norm gains, biases) matters."""
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.15) + (1.0 if "norm" in name else 0.0))
    return model


def compare_grads(tag, tp_model, full_model, group):
    full = dict(full_model.named_parameters())
    plan = shard_plan(tp_model)
    names = [n for n, _ in tp_model.named_parameters()]
    assert names == list(full), f"{tag}: parameter names changed: {names} vs {list(full)}"
    for name, p in tp_model.named_parameters():
        want = full[name].grad
        if name in plan:
            want = plan[name].take(want)
        close(f"{tag} grad", p.grad, want)
        if name not in plan:  # replicated: every rank must hold the very same grad
            parts = [torch.empty_like(p.grad) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, p.grad.contiguous(), group=group)
            assert all(torch.equal(x, parts[0]) for x in parts), f"{tag}: ranks disagree on the grad of {name}"
    for m in (tp_model, full_model):
        m.zero_grad(set_to_none=True)


def check_padded(tag, tp_model, ref, group):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 9), generator=gen)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    g = torch.randn(2, 9, V, generator=gen)
    outs = []
    for m in (tp_model, ref):
        logits = m(ids, position_ids=pos, attention_mask=mask)
        ((logits * g).sum() / ids.numel()).backward()  # a token-mean loss, as in training
        outs.append(logits.detach())
    close(f"{tag} padded logits", *outs)
    compare_grads(f"{tag} padded", tp_model, ref, group)


def check_packed(tag, tp_model, ref, group, n=17):
    gen = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, 5, 6, n])
    ids = torch.randint(0, V, (n,), generator=gen)
    targets = torch.randint(0, V, (n,), generator=gen)
    targets[[4, 5, n - 1]] = -100  # sequence ends: nothing to predict
    targets[0], targets[1] = 0, V // 2  # first row of each vocab shard
    g = torch.randn(n, generator=gen)
    outs = []
    for m in (tp_model, ref):
        hidden = m.forward_packed(ids, cu)
        logp = fused_linear_logprob(hidden, m.output_weight, targets, tp_group=m.tp_group, temperature=0.8)
        (-(logp * g).sum() / (targets != -100).sum()).backward()  # token-mean
        outs.append((hidden.detach(), logp.detach()))
    close(f"{tag} packed hidden", outs[0][0], outs[1][0])
    close(f"{tag} packed logp", outs[0][1], outs[1][1])
    compare_grads(f"{tag} packed", tp_model, ref, group)


def check_generation(tag, tp_model, ref):
    prompts = [[3, 17, 42, 8], [5], [60, 61, 62, 63, 64, 65, 66]]
    params = SamplingParams(greedy=True, max_new_tokens=10)
    got = Generator(tp_model, max_batch=2, max_seq_len=32).generate(prompts, params)
    want = Generator(ref, max_batch=2, max_seq_len=32).generate(prompts, params)
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids, f"{tag} greedy tokens differ: {a.token_ids} vs {b.token_ids}"
        close(f"{tag} generation logprobs", torch.tensor(a.logprobs), torch.tensor(b.logprobs))
    # sampling: every rank must draw the same tokens (they feed the next step on all ranks)
    sampled = Generator(tp_model, max_batch=2, max_seq_len=32).generate(
        prompts, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7))
    mine = [(c.token_ids, c.logprobs) for c in sampled]
    every = [None] * dist.get_world_size(tp_model.tp_group)
    dist.all_gather_object(every, mine, group=tp_model.tp_group)
    assert all(x == every[0] for x in every), f"{tag}: ranks sampled different tokens"


class SpyOpen:
    """safe_open that records the shape of every tensor actually read from the file."""

    reads: list = []

    def __init__(self, *args, **kw):
        self.f = _real_safe_open(*args, **kw)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def keys(self):
        return self.f.keys()

    def get_tensor(self, key):
        t = self.f.get_tensor(key)
        SpyOpen.reads.append(tuple(t.shape))
        return t

    def get_slice(self, key):
        sl = self.f.get_slice(key)

        class Slice:
            def get_shape(_):
                return sl.get_shape()

            def __getitem__(_, index):
                t = sl[index]
                SpyOpen.reads.append(tuple(t.shape))
                return t

        return Slice()


_real_safe_open = hf.safe_open


def check_deepcopy(tag, tp_model):
    """A deep copy (a frozen reference policy) shares the group, not the parameters, and computes the same."""
    twin = copy.deepcopy(tp_model)
    assert twin.tp_group is tp_model.tp_group
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(twin.parameters(), tp_model.parameters()))
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(twin(ids), tp_model(ids)), f"{tag}: the deep copy computes something else"


def check_load_hf(tag, ref, groups, path):
    if groups.tp_rank == 0:
        save_hf(ref, path)
    dist.barrier()
    SpyOpen.reads.clear()
    hf.safe_open = SpyOpen
    try:
        model = load_hf_tp(path, groups)
    finally:
        hf.safe_open = _real_safe_open
    # each rank read exactly its own parameters' elements: no full tensor of a sharded one
    read = sum(math.prod(s) for s in SpyOpen.reads)
    assert read == sum(p.numel() for p in model.parameters()), f"{tag}: read {read} elements from the files"
    full = dict(ref.named_parameters())
    plan = shard_plan(model)
    for name, p in model.named_parameters():
        want = plan[name].take(full[name]) if name in plan else full[name]
        assert torch.equal(p, want), f"{tag} load_hf_tp: {name} is not the checkpoint's slice"
    assert model.layers[0].self_attn.k_proj.weight.shape[0] == ref.cfg.dim_per_head * model.num_kv_heads
    dist.barrier()


def main():
    dist.init_process_group("gloo")
    groups = ParallelDims(dp=1, tp=2, pp=1).build()
    with tempfile.TemporaryDirectory() as tmp:
        # one directory for all ranks: rank 0's temp dir name, broadcast
        obj = [tmp]
        dist.broadcast_object_list(obj, src=0)
        for i, (tag, cfg) in enumerate(CONFIGS.items()):
            ref = randomized(cfg, seed=100 + i)
            tp_model = parallelize_tp(copy.deepcopy(ref), groups)
            check_padded(tag, tp_model, ref, groups.tp)
            check_packed(tag, tp_model, ref, groups.tp)
            check_generation(tag, tp_model, ref)
            check_deepcopy(tag, tp_model)
            set_sequence_parallel(tp_model, True)  # token shards between tp regions: same numbers
            check_padded(f"{tag} sp", tp_model, ref, groups.tp)  # batch 2: dim 0 splits over 2 ranks
            check_packed(f"{tag} sp", tp_model, ref, groups.tp, n=18)
            try:
                check_packed(f"{tag} sp", tp_model, ref, groups.tp, n=17)
            except ValueError as e:
                assert "17 tokens over 2 tp ranks" in str(e), e
            else:
                raise AssertionError("sequence parallelism over an odd pack must fail")
            for m in (tp_model, ref):
                m.zero_grad(set_to_none=True)
            set_sequence_parallel(tp_model, False)
            check_generation(f"{tag} sp off", tp_model, ref)
            check_load_hf(tag, ref, groups, f"{obj[0]}/{tag}")
        dist.barrier()
    if groups.tp_rank == 0:
        for k, v in worst.items():
            print(f"max err {k}: {v:.3g}")
        print("tp model matches single process")
    sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
