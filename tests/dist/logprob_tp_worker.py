"""torchrun worker: vocab-parallel fused_linear_logprob equals the single-process result.

Launched by tests/dist/test_logprob_tp.py as
    python -m torch.distributed.run --nproc-per-node 2 --standalone tests/dist/logprob_tp_worker.py
(gloo, CPU; TRITON_INTERPRET=1 for the Triton path). Every rank builds the same full problem from
one seed, runs it unsharded, then runs its vocab shard with tp_group and compares logp, entropy,
dH, its slice of dW and db. Any mismatch raises, so torchrun exits non-zero.
"""

import os

import torch
import torch.distributed as dist

from sailor_engine.kernels.logprob import fused_linear_logprob

IGNORE = -100


def _problem(n, h, v_total, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v_total, h, generator=gen) * (3.0 / h**0.5)).to(dtype)
    bias = torch.randn(v_total, generator=gen).to(dtype)
    targets = torch.randint(0, v_total, (n,), generator=gen)
    targets[0], targets[1], targets[2] = 0, v_total - 1, IGNORE  # both vocab ends, one ignored row
    targets[3] = v_total // 2  # first entry of rank 1's shard
    # row 4: its max logit sits on the last rank's shard, far above the rest
    weight[-1] = hidden[4] * 4.0
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    return hidden, weight, bias, targets, g


def _run(hidden, weight, bias, targets, g, **kw):
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    logp, ent = fused_linear_logprob(leaves[0], leaves[1], targets, bias=leaves[2], return_entropy=True,
                                     ignore_index=IGNORE, temperature=0.7, **kw)
    (logp.double() * g).sum().backward()
    return logp.detach(), ent, *(x.grad for x in leaves)


def _case(group, impl, dtype, n, h, v_local, atol, rtol):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    hidden, weight, bias, targets, g = _problem(n, h, v_local * world, dtype, seed=1234)
    full = _run(hidden, weight, bias, targets, g, impl=impl)
    lo, hi = rank * v_local, (rank + 1) * v_local
    tp = _run(hidden, weight[lo:hi], bias[lo:hi], targets, g, impl=impl, tp_group=group)
    expect = [full[0], full[1], full[2], full[3][lo:hi], full[4][lo:hi]]
    for name, a, b in zip(("logp", "entropy", "dH", "dW", "db"), tp, expect):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{impl} {dtype} {name}: {m}")
    # every rank must hold the very same log-probs and hidden grad (bit for bit)
    for name, t in (("logp", tp[0]), ("dH", tp[2])):
        gathered = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(gathered, t.contiguous(), group=group)
        assert all(torch.equal(x, gathered[0]) for x in gathered), f"{impl} {dtype}: ranks disagree on {name}"
    assert (tp[0] <= 0).all() and tp[0][2] == 0 and torch.all(tp[2][2] == 0)


def main():
    dist.init_process_group("gloo")
    group = dist.new_group(list(range(dist.get_world_size())))
    _case(group, "torch", torch.float64, n=9, h=12, v_local=37, atol=1e-12, rtol=1e-10)
    _case(group, "torch", torch.float32, n=9, h=12, v_local=37, atol=2e-5, rtol=2e-5)
    _case(group, "torch", torch.bfloat16, n=9, h=12, v_local=37, atol=2e-2, rtol=2e-2)
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        _case(group, "triton", torch.float32, n=9, h=40, v_local=70, atol=2e-5, rtol=2e-5)
        _case(group, "triton", torch.bfloat16, n=9, h=40, v_local=70, atol=2e-2, rtol=2e-2)
    dist.barrier()
    if dist.get_rank() == 0:
        print("logprob tp worker: all cases match")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
