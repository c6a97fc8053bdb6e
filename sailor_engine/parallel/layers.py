"""Tensor-parallel layers: column / row-parallel linear, vocab-parallel embedding and LM head.

    col = ColumnParallelLinear(H, F, group=g)             # weight (F / tp, H): y = x W_r^T, sharded output
    row = RowParallelLinear(F, H, group=g)                # weight (H, F / tp): y = sum_r x_r W_r^T (+ b)
    emb = VocabParallelEmbedding(V, H, group=g)           # weight (V / tp, H): masked lookup + all-reduce
    logp = vocab_parallel_logprob(hidden, emb.weight, targets, group=g)   # never (N, V) on any rank

Megatron's scheme: a column-parallel linear followed by a row-parallel one costs one all-reduce
forward and one backward (copy_to_tp / reduce_from_tp in mappings.py). Rank r holds the r-th
contiguous block of the sharded dim. Each layer records where its parameters sit in the full
tensors (`shards`: parameter name -> Shard), which is what sharded loading and checkpoint
assembly read; parameters absent from `shards` are replicated.

Parameters are allocated uninitialised: the caller fills them (parallelize.py copies slices of a
full model or reads them straight from safetensors).

Sequence parallelism (`sequence_parallel=True`): the layer's replicated side is a (N / tp, ...)
token shard; entering gathers tokens (gather_from_sp), leaving reduce-scatters them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sailor_engine.kernels.logprob import fused_linear_logprob
from sailor_engine.model.transformer import RMSNorm, rms_norm

from .mappings import (copy_to_tp, gather_from_sp, gather_from_tp, reduce_from_tp, reduce_scatter_to_sp,
                       scatter_to_tp)


@dataclass(frozen=True)
class Shard:
    """This rank's block [start, stop) along `dim` of a full tensor whose size along `dim` is `size`."""

    dim: int
    start: int
    stop: int
    size: int

    def take(self, full: Tensor) -> Tensor:
        self._check(full.shape)
        return full.narrow(self.dim, self.start, self.stop - self.start)

    def read(self, sl) -> Tensor:
        """Read only this block from a safetensors slice (`safe_open(...).get_slice(key)`)."""
        self._check(sl.get_shape())
        index = (slice(None),) * self.dim + (slice(self.start, self.stop),)
        return sl[index]

    def _check(self, shape) -> None:
        if len(shape) <= self.dim or shape[self.dim] != self.size:
            raise ValueError(f"full tensor of shape {tuple(shape)} does not match the tp layout "
                             f"(size {self.size} along dim {self.dim})")


class SharedGroup:
    """A process group held by a module. copy.deepcopy of the module shares it rather than copying
    it: a ProcessGroup cannot be copied, and a copy (a frozen reference policy, say) runs on the
    same ranks."""

    __slots__ = ("group",)

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __deepcopy__(self, memo):
        return self


class _TPModule(nn.Module):
    @property
    def group(self) -> dist.ProcessGroup:
        return self._group.group


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size ({parts})")
    return total // parts


class ColumnParallelLinear(_TPModule):
    """y = x A^T + b with A split by rows (output features): rank r computes y[..., block r].

    x: (..., in_features) replicated (or a token shard under sequence_parallel) -> y: (..., out / tp),
    or (..., out) with gather_output. input_in_tp_region: the caller already passed x through
    copy_to_tp / gather_from_sp once for several consumers (q, k, v share one backward all-reduce).

    replicas > 1: out_features has tp / replicas distinct blocks, each held by `replicas` consecutive
    ranks (GQA with fewer kv heads than ranks). Each replica's weight grad is partial (its own query
    heads only) and is summed over the replicas in the backward.
    """

    def __init__(self, in_features: int, out_features: int, *, group: dist.ProcessGroup, bias: bool = True,
                 gather_output: bool = False, input_in_tp_region: bool = False, sequence_parallel: bool = False,
                 replicas: int = 1, device=None, dtype=None):
        super().__init__()
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if replicas < 1 or world % replicas:
            raise ValueError(f"replicas ({replicas}) must divide the tensor-parallel size ({world})")
        if gather_output and replicas > 1:
            raise ValueError("gather_output needs distinct shards on every rank (replicas = 1)")
        blocks = world // replicas
        local = _divide(out_features, blocks, f"out_features of a column-parallel linear split {blocks} ways")
        block = rank // replicas
        self._group, self.gather_output, self.replicas, self.block = SharedGroup(group), gather_output, replicas, block
        self.input_in_tp_region, self.sequence_parallel = input_in_tp_region, sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(local, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(local, device=device, dtype=dtype)) if bias else None
        rows = Shard(0, block * local, (block + 1) * local, out_features)
        self.shards = {"weight": rows} | ({"bias": rows} if bias else {})

    def forward(self, x: Tensor) -> Tensor:
        if not self.input_in_tp_region:
            x = gather_from_sp(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        w, b = self.weight, self.bias
        if self.replicas > 1:
            w = sum_over_replicas(w, self.group, self.replicas)
            b = None if b is None else sum_over_replicas(b, self.group, self.replicas)
        y = F.linear(x, w, b)
        return gather_from_tp(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (local {self.weight.shape[0]}), "
                f"bias={self.bias is not None}, replicas={self.replicas}")


class RowParallelLinear(_TPModule):
    """y = x A^T + b with A split by columns (input features): y = sum_r x_r A_r^T, then + b once.

    x: (..., in / tp) sharded (input_is_parallel) or (..., in) replicated -> y: (..., out) replicated,
    or the (N / tp, out) token shard under sequence_parallel (x then is (N, in / tp)). The bias is
    added after the reduction so it counts once.
    """

    def __init__(self, in_features: int, out_features: int, *, group: dist.ProcessGroup, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, device=None, dtype=None):
        super().__init__()
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel needs input_is_parallel=True (as in Megatron)")
        local = _divide(in_features, world, "in_features of a row-parallel linear")
        self._group, self.input_is_parallel, self.sequence_parallel = SharedGroup(group), input_is_parallel, sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, local, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.shards = {"weight": Shard(1, rank * local, (rank + 1) * local, in_features)}  # the bias is replicated

    def forward(self, x: Tensor) -> Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        y = F.linear(x, self.weight)
        if not self.sequence_parallel:
            y = reduce_from_tp(y, self.group)
            return y if self.bias is None else y + self.bias
        # token shards: each rank's bias grad covers its own tokens only, hence the all-reduce
        y = reduce_scatter_to_sp(y, self.group)
        return y if self.bias is None else y + copy_to_tp(self.bias, self.group)

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (local {self.weight.shape[1]}), out={self.out_features}, "
                f"bias={self.bias is not None}")


class VocabParallelEmbedding(_TPModule):
    """Rows [r * V / tp, (r + 1) * V / tp) on rank r; ids elsewhere look up zeros, then all-reduce.

    ids: (...) global token ids, replicated -> (..., H) replicated (each id found on exactly one
    rank, so the sum is exact: x + 0). Under sequence_parallel the sum is reduce-scattered into
    this rank's (N / tp, H) token shard instead (ids (N,)).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group: dist.ProcessGroup,
                 sequence_parallel: bool = False, device=None, dtype=None):
        super().__init__()
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        local = _divide(num_embeddings, world, "vocab_size of a vocab-parallel embedding")
        self._group, self.sequence_parallel = SharedGroup(group), sequence_parallel
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.lo, self.hi = rank * local, (rank + 1) * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim, device=device, dtype=dtype))
        self.shards = {"weight": Shard(0, self.lo, self.hi, num_embeddings)}

    def forward(self, ids: Tensor) -> Tensor:
        outside = (ids < self.lo) | (ids >= self.hi)
        local = torch.where(outside, 0, ids - self.lo)
        # masked_fill keeps the grad of foreign ids off local row 0
        y = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_scatter_to_sp(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} (rows {self.lo}:{self.hi}), {self.embedding_dim}"


class TPRMSNorm(RMSNorm, _TPModule):
    """RMSNorm in a tensor-parallel model: same parameter (`weight`) and numerics, plus its place in
    the tp dataflow, by role:

    "heads"  the Qwen3 q/k norms: each rank normalises its own heads, so the weight grad is partial
             and all-reduced over tp.
    "enter"  a block's input norm: its output enters the tp region once for all its consumers
             (copy_to_tp; gather_from_sp under sequence parallelism), so q/k/v or gate/up share one
             backward all-reduce.
    "final"  the final norm: output replicated (under sequence parallelism gathered with a split
             backward, since both consumers, the fused log-prob and vocab_parallel_logits, already
             leave the whole dH on every rank).
    Under sequence parallelism "enter" and "final" see a token shard, so their weight grads are
    partial too and all-reduced.
    """

    def __init__(self, dim: int, eps: float, *, group: dist.ProcessGroup, role: str,
                 sequence_parallel: bool = False, device=None, dtype=None):
        super().__init__(dim, eps, device=device, dtype=dtype)
        if role not in ("heads", "enter", "final"):
            raise ValueError(f"TPRMSNorm role must be heads, enter or final, got {role!r}")
        self._group, self.role, self.sequence_parallel = SharedGroup(group), role, sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        partial = self.role == "heads" or self.sequence_parallel
        y = rms_norm(x, copy_to_tp(self.weight, self.group) if partial else self.weight, self.eps)
        if self.role == "enter":
            return gather_from_sp(y, self.group) if self.sequence_parallel else copy_to_tp(y, self.group)
        if self.role == "final" and self.sequence_parallel:
            return gather_from_sp(y, self.group, reduce_grad=False)
        return y


class _SumOverReplicas(torch.autograd.Function):
    """Identity forward; backward sums the grad over the ranks holding the same block."""

    @staticmethod
    def forward(ctx, w, group, replicas):
        ctx.group, ctx.replicas = group, replicas
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        # One all-reduce over the tp group: each rank writes its grad at its block's row of a zeroed
        # (blocks, ...) buffer, so the sum of a row is its replicas' grads (+ exact zeros).
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        buf = g.new_zeros((world // ctx.replicas, *g.shape))
        buf[rank // ctx.replicas] = g
        dist.all_reduce(buf, group=ctx.group)
        return buf[rank // ctx.replicas], None, None


def sum_over_replicas(w: Tensor, group: dist.ProcessGroup, replicas: int) -> Tensor:
    return w if replicas == 1 else _SumOverReplicas.apply(w, group, replicas)


def vocab_parallel_logits(hidden: Tensor, weight: Tensor, group: dist.ProcessGroup) -> Tensor:
    """(..., H) replicated -> (..., V) full logits gathered from the (V / tp, H) shards.

    For sampling and tests only (R rows at a time); the training loss uses vocab_parallel_logprob.
    """
    return gather_from_tp(F.linear(copy_to_tp(hidden, group), weight), group)


def vocab_parallel_logprob(hidden: Tensor, weight: Tensor, targets: Tensor, *, group: dist.ProcessGroup,
                           **kw) -> Tensor | tuple[Tensor, Tensor]:
    """log p(targets) from this rank's LM-head shard: fused_linear_logprob(..., tp_group=group).

    hidden (..., H) must be replicated over the group and must NOT pass through copy_to_tp: the
    kernel all-reduces dH itself. Under sequence parallelism gather the final norm's token shards
    with gather_from_sp(h, group, reduce_grad=False). targets are global vocab ids; `kw` as for
    fused_linear_logprob (temperature, return_entropy, ignore_index, bias, impl).
    """
    return fused_linear_logprob(hidden, weight, targets, tp_group=group, **kw)
