"""torchrun worker: our tp layers and mappings against megatron-core 0.16.1 on the same weights.

Launched by tests/parallel/test_tp_layers.py (2 gloo ranks, fp32). Every rank builds the same
full weights and inputs from one seed, loads its shard into megatron-core's ColumnParallelLinear /
RowParallelLinear and into ours, runs forward and backward with the same output grad, and compares
outputs, input grads and weight / bias grads; the vocab-parallel log-prob is compared with
megatron's vocab_parallel_cross_entropy (fed by a megatron column-parallel LM head), the
vocab-parallel embedding with megatron's and with a plain lookup. Then sequence-parallel layers
against the same layers on replicated tokens (megatron-core's sequence-parallel path allocates on
CUDA), and the mappings against their single-process meaning. Any mismatch raises.
"""

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear as MColumn
from megatron.core.tensor_parallel import RowParallelLinear as MRow
from megatron.core.tensor_parallel import VocabParallelEmbedding as MEmbedding
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from sailor_engine.parallel import mappings as mp
from sailor_engine.parallel.dims import ParallelDims
from sailor_engine.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                           vocab_parallel_logprob)

ATOL = 1e-5
worst = {}


def close(name, a, b, atol=ATOL):
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    worst[name] = max(worst.get(name, 0.0), err)
    assert a.shape == b.shape and err <= atol, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}, max err {err}"


def mcore_config():
    return ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True,
                               gradient_accumulation_fusion=False, params_dtype=torch.float32)


def run(layer, x, gy, ours: bool):
    x = x.clone().requires_grad_()
    out = layer(x)
    y = out if ours else out[0]
    (y * gy).sum().backward()
    return y.detach(), x.grad


def check_column(g, rank, gather_output, bias):
    gen = torch.Generator().manual_seed(10 + 2 * gather_output + bias)
    S, B, H, F = 5, 3, 12, 20
    w, b = torch.randn(F, H, generator=gen), torch.randn(F, generator=gen)
    x = torch.randn(S, B, H, generator=gen)
    gy = torch.randn(S, B, F if gather_output else F // 2, generator=gen)
    if not gather_output:  # each rank's output grad is its block of one full grad
        gy = torch.randn(S, B, F, generator=gen)[..., rank * F // 2:(rank + 1) * F // 2]
    # megatron's own gather allocates on torch.cuda.current_device(): run it ungathered and gather
    # its output here (its output grad is then this rank's block of the full one)
    m = MColumn(H, F, config=mcore_config(), init_method=torch.nn.init.zeros_, bias=bias, gather_output=False)
    o = ColumnParallelLinear(H, F, group=g, bias=bias, gather_output=gather_output)
    with torch.no_grad():
        for layer in (m, o):
            layer.weight.copy_(w[rank * F // 2:(rank + 1) * F // 2])
            if bias:
                layer.bias.copy_(b[rank * F // 2:(rank + 1) * F // 2])
    gy_m = gy[..., rank * F // 2:(rank + 1) * F // 2] if gather_output else gy
    (ym, dxm), (yo, dxo) = run(m, x, gy_m, False), run(o, x, gy, True)
    if gather_output:
        parts = [torch.empty_like(ym) for _ in range(2)]
        dist.all_gather(parts, ym.contiguous(), group=g)
        ym = torch.cat(parts, -1)
    tag = f"column(gather={gather_output}, bias={bias})"
    close(f"{tag} y", yo, ym)
    close(f"{tag} dx", dxo, dxm)
    close(f"{tag} dW", o.weight.grad, m.weight.grad)
    if bias:
        close(f"{tag} db", o.bias.grad, m.bias.grad)


def check_row(g, rank, input_is_parallel, bias):
    gen = torch.Generator().manual_seed(20 + 2 * input_is_parallel + bias)
    S, B, F, H = 4, 3, 16, 10
    w, b = torch.randn(H, F, generator=gen), torch.randn(H, generator=gen)
    x = torch.randn(S, B, F, generator=gen)
    x_block = x[..., rank * F // 2:(rank + 1) * F // 2]
    if input_is_parallel:
        x = x_block
    gy = torch.randn(S, B, H, generator=gen)
    # megatron's scatter backward allocates on torch.cuda.current_device(): feed it the scattered
    # input and gather its input grad here
    m = MRow(F, H, config=mcore_config(), init_method=torch.nn.init.zeros_, bias=bias,
             input_is_parallel=True, skip_bias_add=False)
    o = RowParallelLinear(F, H, group=g, bias=bias, input_is_parallel=input_is_parallel)
    with torch.no_grad():
        for layer in (m, o):
            layer.weight.copy_(w[:, rank * F // 2:(rank + 1) * F // 2])
            if bias:
                layer.bias.copy_(b)
    (ym, dxm), (yo, dxo) = run(m, x_block, gy, False), run(o, x, gy, True)
    if not input_is_parallel:
        parts = [torch.empty_like(dxm) for _ in range(2)]
        dist.all_gather(parts, dxm.contiguous(), group=g)
        dxm = torch.cat(parts, -1)
    tag = f"row(input_is_parallel={input_is_parallel}, bias={bias})"
    close(f"{tag} y", yo, ym)
    close(f"{tag} dx", dxo, dxm)
    close(f"{tag} dW", o.weight.grad, m.weight.grad)
    if bias:
        close(f"{tag} db", o.bias.grad, m.bias.grad)


def check_vocab_logprob(g, rank, impl):
    """-log p from our fused vocab-parallel head == megatron's column-parallel head + vocab-parallel CE."""
    gen = torch.Generator().manual_seed(30)
    S, B, H, V = 7, 2, 16, 46
    w = torch.randn(V, H, generator=gen) * 0.5
    hidden = torch.randn(S, B, H, generator=gen)
    targets = torch.randint(0, V, (S, B), generator=gen)
    targets[0, 0], targets[0, 1], targets[1, 0] = 0, V - 1, V // 2  # both ends, first row of rank 1
    gl = torch.randn(S, B, generator=gen)
    shard = w[rank * V // 2:(rank + 1) * V // 2]
    head = MColumn(H, V, config=mcore_config(), init_method=torch.nn.init.zeros_, bias=False)
    with torch.no_grad():
        head.weight.copy_(shard)
    hm = hidden.clone().requires_grad_()
    loss_m = vocab_parallel_cross_entropy(head(hm)[0], targets)
    (loss_m * gl).sum().backward()
    ho, wo = hidden.clone().requires_grad_(), shard.clone().requires_grad_()
    loss_o = -vocab_parallel_logprob(ho, wo, targets, group=g, impl=impl)
    (loss_o * gl).sum().backward()
    close(f"vocab logprob ({impl}) loss", loss_o, loss_m)
    close(f"vocab logprob ({impl}) dH", ho.grad, hm.grad)
    close(f"vocab logprob ({impl}) dW", wo.grad, head.weight.grad)


def check_embedding(g, rank):
    gen = torch.Generator().manual_seed(40)
    V, H = 30, 8
    w = torch.randn(V, H, generator=gen)
    ids = torch.randint(0, V, (4, 6), generator=gen)
    ids[0, :3] = torch.tensor([0, V // 2 - 1, V // 2])  # the shard boundary
    gy = torch.randn(4, 6, H, generator=gen)
    full = w.clone().requires_grad_()
    (torch.nn.functional.embedding(ids, full) * gy).sum().backward()
    emb = VocabParallelEmbedding(V, H, group=g)
    m = MEmbedding(V, H, init_method=torch.nn.init.zeros_, config=mcore_config())
    with torch.no_grad():
        emb.weight.copy_(emb.shards["weight"].take(w))
        m.weight.copy_(emb.weight)
    y, ym = emb(ids), m(ids)
    (y * gy).sum().backward()
    (ym * gy).sum().backward()
    close("embedding y", y, torch.nn.functional.embedding(ids, w), atol=0.0)
    close("embedding dW", emb.weight.grad, emb.shards["weight"].take(full.grad), atol=0.0)
    close("embedding y vs megatron", y, ym, atol=0.0)
    close("embedding dW vs megatron", emb.weight.grad, m.weight.grad, atol=0.0)


def check_sequence_parallel(g, rank):
    """A column -> row pair on token shards (gather in, reduce-scatter out) equals the same pair on
    replicated tokens, restricted to this rank's tokens: outputs and every grad."""
    gen = torch.Generator().manual_seed(60)
    N, H, F = 6, 8, 12
    w1, b1, w2, b2 = (torch.randn(F, H, generator=gen), torch.randn(F, generator=gen),
                      torch.randn(H, F, generator=gen), torch.randn(H, generator=gen))
    x, gy = torch.randn(N, H, generator=gen), torch.randn(N, H, generator=gen)
    outs = []
    for sp in (False, True):
        col = ColumnParallelLinear(H, F, group=g, sequence_parallel=sp)
        row = RowParallelLinear(F, H, group=g, sequence_parallel=sp)
        with torch.no_grad():
            col.weight.copy_(col.shards["weight"].take(w1))
            col.bias.copy_(col.shards["bias"].take(b1))
            row.weight.copy_(row.shards["weight"].take(w2))
            row.bias.copy_(b2)
        xi = (x.chunk(2)[rank] if sp else x).clone().requires_grad_()
        y = row(torch.relu(col(xi)))
        (y * (gy.chunk(2)[rank] if sp else gy)).sum().backward()
        outs.append((y, xi.grad, col.weight.grad, col.bias.grad, row.weight.grad, row.bias.grad))
    (y, dx, *grads), (y_sp, dx_sp, *grads_sp) = outs
    close("sp pair y", y_sp, y.chunk(2)[rank], atol=1e-6)
    close("sp pair dx", dx_sp, dx.chunk(2)[rank], atol=1e-6)
    for name, a, b in zip(("dW1", "db1", "dW2", "db2"), grads_sp, grads):
        close(f"sp pair {name}", a, b, atol=1e-5)


def check_mappings(g, rank):
    """Each mapping's forward and backward against what it means on the concatenated tensors."""
    gen = torch.Generator().manual_seed(50)
    full = torch.randn(6, 8, generator=gen)  # the same on both ranks
    per_rank = [torch.randn(6, 8, generator=gen) for _ in range(2)]  # rank-dependent data, known to all
    gys = [torch.randn(6, 8, generator=gen) for _ in range(2)]
    mine, gy = per_rank[rank], gys[rank]
    block = lambda t, dim: t.chunk(2, dim)[rank]  # noqa: E731

    cases = {
        # name: (fn, input, output grad, expected output, expected input grad)
        "copy_to_tp": (mp.copy_to_tp, full, gy, full, gys[0] + gys[1]),
        "reduce_from_tp": (mp.reduce_from_tp, mine, gys[0], per_rank[0] + per_rank[1], gys[0]),
        "gather_from_tp": (mp.gather_from_tp, block(full, -1), gys[0], full, block(gys[0], -1)),
        "scatter_to_tp": (mp.scatter_to_tp, full, block(gy, -1), block(full, -1),  # dx: every rank's grad block
                          torch.cat([gys[r].chunk(2, -1)[r] for r in range(2)], -1)),
        "gather_from_sp": (mp.gather_from_sp, block(full, 0), gy, full, block(gys[0] + gys[1], 0)),
        "gather_from_sp(reduce_grad=False)": (lambda x, grp: mp.gather_from_sp(x, grp, reduce_grad=False),
                                              block(full, 0), gys[0], full, block(gys[0], 0)),
        "reduce_scatter_to_sp": (mp.reduce_scatter_to_sp, mine, block(gy, 0), block(per_rank[0] + per_rank[1], 0),
                                 torch.cat([gys[r].chunk(2, 0)[r] for r in range(2)], 0)),
        "scatter_to_sp": (mp.scatter_to_sp, full, block(gy, 0), block(full, 0),
                          torch.cat([gys[r].chunk(2, 0)[r] for r in range(2)], 0)),
    }
    for name, (fn, x, g_out, want_y, want_dx) in cases.items():
        x = x.clone().requires_grad_()
        y = fn(x, g)
        (y * g_out).sum().backward()
        close(f"{name} y", y, want_y, atol=1e-6)
        close(f"{name} dx", x.grad, want_dx, atol=1e-6)
    try:
        mp.reduce_scatter_to_sp(torch.zeros(5, 2), g)
    except ValueError as e:
        assert "5 tokens over 2 tp ranks" in str(e), e
    else:
        raise AssertionError("reduce-scatter of 5 tokens over 2 ranks must fail")


def main():
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    groups = ParallelDims(dp=1, tp=2, pp=1).build()
    g, rank = groups.tp, groups.tp_rank
    for gather_output in (False, True):
        for bias in (False, True):
            check_column(g, rank, gather_output, bias)
    for input_is_parallel in (True, False):
        for bias in (False, True):
            check_row(g, rank, input_is_parallel, bias)
    check_vocab_logprob(g, rank, "torch")
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        check_vocab_logprob(g, rank, "triton")
    check_embedding(g, rank)
    check_sequence_parallel(g, rank)
    check_mappings(g, rank)
    dist.barrier()
    if rank == 0:
        for k, v in worst.items():
            print(f"max err {k}: {v:.3g}")
        print("tp layers match megatron-core")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
