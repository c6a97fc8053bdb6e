"""Tensor-parallel communication as paired autograd functions (Megatron's "mappings").

Each op is one collective in the forward and its adjoint in the backward, so a module built from
them differentiates correctly without any hand-written gradient code:

    op                     forward                          backward
    copy_to_tp             identity                         all-reduce
    reduce_from_tp         all-reduce                       identity
    gather_from_tp         all-gather along the last dim    split along the last dim
    scatter_to_tp          split along the last dim         all-gather along the last dim
    gather_from_sp         all-gather along dim 0           reduce-scatter along dim 0 (or split)
    reduce_scatter_to_sp   reduce-scatter along dim 0       all-gather along dim 0
    scatter_to_sp          split along dim 0                all-gather along dim 0

"tp region": activations sharded over the tp axis (one rank's heads / MLP columns / vocab slice).
"sp": sequence parallelism, activations sharded along the token dim (dim 0 of a packed (N, H)
stream) between tp regions, so norms and residual adds run on N / tp tokens per rank.

Every function takes the process group as an argument; with a group of one rank each is the
identity (no collective is issued). Sums are the backend's all-reduce: on 2 ranks a + b, the
same on every rank, so all ranks hold bit-identical results.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# torch >= 2.12 renames the tensor collectives (the old names warn); same signatures.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _world(group: dist.ProcessGroup) -> int:
    return dist.get_world_size(group)


def _all_reduce(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    y = x.clone(memory_format=torch.contiguous_format)  # never reduce in place into a caller's tensor
    dist.all_reduce(y, group=group)
    return y


def _split(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    world, size = _world(group), x.shape[dim]
    if size % world:
        raise ValueError(f"cannot split dim {dim} of size {size} over {world} tp ranks: not divisible")
    return x.chunk(world, dim)[dist.get_rank(group)].contiguous()


def _gather(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    world = _world(group)
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x, group=group)
    return out if dim == 0 else out.movedim(0, dim).contiguous()


def _reduce_scatter(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    world, n = _world(group), x.shape[0]
    if n % world:
        raise ValueError(f"cannot reduce-scatter {n} tokens over {world} tp ranks: not divisible "
                         "(sequence parallelism needs dim 0 of every forward to be a multiple of the tp size)")
    out = x.new_empty((n // world, *x.shape[1:]))
    _reduce_scatter_single(out, x.contiguous(), group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1, ctx.group), None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, -1, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, reduce_grad):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return _gather(x, 0, group)

    @staticmethod
    def backward(ctx, g):
        return (_reduce_scatter(g, ctx.group) if ctx.reduce_grad else _split(g, 0, ctx.group)), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, 0, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, 0, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, 0, ctx.group), None


def copy_to_tp(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Enter the tp region: identity forward; backward sums the ranks' partial input grads."""
    return x if _world(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Leave the tp region: sum the ranks' partial outputs; the output grad is already whole."""
    return x if _world(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """(..., D / tp) shards -> (..., D) in rank order; backward keeps this rank's slice."""
    return x if _world(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_tp(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """(..., D) replicated -> this rank's (..., D / tp) slice; backward all-gathers."""
    return x if _world(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_sp(x: Tensor, group: dist.ProcessGroup, *, reduce_grad: bool = True) -> Tensor:
    """(N / tp, ...) token shards -> (N, ...) replicated, entering a tp region.

    Backward: reduce-scatter when the consumers are tp-sharded (each rank's grad is partial: the
    column-parallel linears). reduce_grad=False splits instead, for consumers whose backward already
    leaves the whole grad on every rank (fused_linear_logprob all-reduces dH itself).
    """
    return x if _world(group) == 1 else _GatherFromSP.apply(x, group, reduce_grad)


def reduce_scatter_to_sp(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """(N, ...) partial sums -> this rank's (N / tp, ...) token shard of the sum (row-parallel output)."""
    return x if _world(group) == 1 else _ReduceScatterToSP.apply(x, group)


def scatter_to_sp(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """(N, ...) replicated -> this rank's (N / tp, ...) token shard; backward all-gathers."""
    return x if _world(group) == 1 else _ScatterToSP.apply(x, group)
