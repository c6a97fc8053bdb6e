"""Pipeline parallelism: a balanced partition of the decoder into stages, a 1F1B schedule over
micro-batches of packed varlen sequences, and pipelined decode.

    ranges = stage_layers(model.cfg, dims.pp)                        # one range of layers per stage
    stage = PipelineStage(model, ranges[groups.pp_rank], groups.pp_rank, dims.pp)
    mbs = [MicroBatch.packed(b.input_ids, b.cu_seqlens) for b in packed]   # first stage (others may pass None)
    loss = one_f_one_b(stage, mbs, loss_fn, groups.pp)               # loss_fn(hidden, i) on the last stage
    outs = pipelined_decode(stage, prompts, groups.pp, max_new_tokens=256, num_groups=2 * dims.pp)

Partition. Every piece is costed by its parameter count: a decoder layer's matmuls cost 2 FLOPs per
parameter per token, the LM head's likewise (2*V*H), and weights, gradients and optimizer state
are bytes per parameter, so parameters balance compute and memory at once. The one exception is
the embedding: a gather, no FLOPs, but V*H parameters of memory. Counting it anyway gives the
first stage fewer layers, which is where 1F1B wants them: stage s holds the activations of up to
pp - s micro-batches, the first stage the most. The first stage holds the embedding, the last the
final norm and the LM head (its own copy of the embedding when tied, see below); layers are split
contiguously, at least one per stage, minimising the largest stage cost (exact dynamic program).

Stage. `PipelineStage` takes its pieces of a full `Transformer` (shared, not copied: build the
model on the meta device and materialise only the stage's parameters for a real run). Parameter
names are the model's ("layers.7.mlp.up_proj.weight"), so checkpoints map one to one. It runs its
layers on a packed stream: the first stage maps input_ids (N,) to hidden (N, H), the others take
hidden (N, H); every stage builds its RoPE tables from positions (N,) and confines attention to
each sequence with cu_seqlens (S + 1,); the last applies the final norm.

Tied embeddings with pp > 1: the last stage holds `lm_head.weight`, a copy of the embedding made at
construction (a checkpoint loader fills it from "embed_tokens.weight"). Both copies receive the sum
of their gradients at the end of `one_f_one_b` (one p2p exchange between the first and last stage;
a + b == b + a in floating point, so the copies stay bit-identical under the same optimizer).

Schedule (1F1B, PipeDream-flush). Stage s of P runs min(P - 1 - s, m) warm-up forwards, then
alternates one forward and one backward, then drains the remaining backwards, so it never holds
more than P - s micro-batches of activations, whatever m. Micro-batches of packed sequences differ
in N, so shapes travel before tensors: once per step, before any activation, the first stage
broadcasts every micro-batch's metadata (sizes, cu_seqlens and positions, int64) over the pp group.
After that every activation (N_i, H) and gradient (N_i, H) has a known shape, and simultaneous
send/receive pairs go through one `dist.batch_isend_irecv` (no ordering deadlock).

Loss. `loss_fn(hidden, i)` runs on the last stage for micro-batch i and returns that micro-batch's
share of the step's loss, normalised by global counts of the whole step (e.g. `rft_loss` in
data.py, `rl_loss` in rl/loss.py with `global_norm`), so the summed micro-batch losses equal the
full-batch loss and the accumulated gradients equal the full-batch gradients. No rescaling here.

Pipelined decode. `pipelined_decode` generates with the stages passing hidden states: each stage
caches its own layers (`PipelineStage.new_kv_cache`, indexed layer_idx - layers.start), the prompts
are dealt into k groups, and the first stage emits group after group without waiting, so with
k >= pp every stage has work (a group advances one token per pass through the pipe). The last
stage picks tokens (greedy, or any sampler given) and sends them back to the first, which retires
finished sequences and re-emits the rest of the group. Not yet wired into rollout.Generator: its
continuous batching (admitting new prompts, parking a session at a tool call and resuming with
only the appended tokens) would replace the fixed groups here; the per-item metadata (cu_seqlens,
slots) already carries arbitrary chunk lengths, so prefill of a resumed session is the same message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sailor_engine.model.attention import CachedAttention, VarlenAttention, compute_dtype, model_backend
from sailor_engine.model.kv_cache import KVCache
from sailor_engine.model.config import ModelConfig
from sailor_engine.model.transformer import DecoderLayer, Transformer, packed_positions, rope_tables

# -- partition -------------------------------------------------------------------------------------


def balanced_partition(costs: Sequence[int], pp: int, *, first_extra: int = 0, last_extra: int = 0) -> list[range]:
    """Split layers 0..L-1 into pp contiguous non-empty ranges minimising the largest stage cost.

    costs: (L,) per-layer cost; first_extra / last_extra are added to the first / last stage (the
    embedding, the final norm and LM head). Exact: dynamic program over split points, O(pp * L^2).
    Ties go to the earliest split, so the result is deterministic on every rank.
    """
    L = len(costs)
    if pp < 1 or L < pp:
        raise ValueError(f"cannot split {L} layers into {pp} pipeline stages (need 1 <= pp <= num_layers)")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, a: int, b: int) -> int:  # layers [a, b) on `stage`
        return prefix[b] - prefix[a] + (first_extra if stage == 0 else 0) + (last_extra if stage == pp - 1 else 0)

    inf = float("inf")
    # best[k][j]: smallest max cost putting layers [0, j) on stages 0..k-1; cut[k][j]: where stage k-1 starts.
    best = [[inf] * (L + 1) for _ in range(pp + 1)]
    cut = [[0] * (L + 1) for _ in range(pp + 1)]
    best[0][0] = 0
    for k in range(1, pp + 1):
        for j in range(k, L - (pp - k) + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], cost(k - 1, i, j))
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    bounds, j = [L], L
    for k in range(pp, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    bounds.reverse()
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def stage_layers(cfg: ModelConfig, pp: int) -> list[range]:
    """The decoder layers of each of pp stages, balanced by parameter count (see the module docstring)."""
    layer = sum(p.numel() for p in DecoderLayer(cfg, 0, device="meta").parameters())
    table = cfg.vocab_size * cfg.hidden_size
    head = cfg.hidden_size + table  # final norm + LM head (or the last stage's copy of a tied embedding)
    return balanced_partition([layer] * cfg.num_layers, pp, first_extra=table, last_extra=head)


# -- stage -----------------------------------------------------------------------------------------


class PipelineStage(nn.Module):
    """The layers `layers` of `model`, plus the embedding on stage 0 and the final norm + head on the last.

    forward(x, cu_seqlens, positions): x is input_ids (N,) on the first stage, hidden (N, H)
    elsewhere; returns hidden (N, H), after the final norm on the last stage. With pp == 1 the stage
    is the whole model (`forward_packed` plus `output_weight`), the module data.py wraps.
    """

    def __init__(self, model: Transformer, layers: range, pp_rank: int, pp: int):
        super().__init__()
        if not 0 <= pp_rank < pp:
            raise ValueError(f"pp_rank {pp_rank} outside pp = {pp}")
        if len(layers) == 0 or layers.step != 1 or layers.start < 0 or layers.stop > len(model.layers):
            raise ValueError(f"stage layers {layers} must be a non-empty contiguous part of 0..{len(model.layers) - 1}")
        self.cfg, self.layer_range, self.pp_rank, self.pp = model.cfg, layers, pp_rank, pp
        self.is_first, self.is_last = pp_rank == 0, pp_rank == pp - 1
        self.embed_tokens = model.embed_tokens if self.is_first else None
        # Keyed by the global layer index, so parameter names match the full model's.
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if self.is_last else None
        self.tied_copy = self.is_last and not self.is_first and model.lm_head is None
        if not self.is_last:
            self.lm_head = None
        elif self.tied_copy:
            w = model.embed_tokens.weight
            self.lm_head = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                self.lm_head.weight.copy_(w)
        else:
            self.lm_head = model.lm_head  # None when tied on a single stage: output_weight is the embedding
        self.register_buffer("inv_freq", model.inv_freq, persistent=False)
        self._backends: dict[tuple, str] = {}

    @property
    def output_weight(self) -> Tensor:
        """(V, H) LM head matrix of the last stage, for the fused log-prob kernel."""
        if not self.is_last:
            raise RuntimeError(f"pipeline stage {self.pp_rank} of {self.pp} holds no LM head (only the last does)")
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def tied_weight(self) -> Tensor | None:
        """This stage's copy of a tied embedding split across the first and last stage, else None."""
        if self.cfg.tie_word_embeddings and self.pp > 1:
            if self.is_first:
                return self.embed_tokens.weight
            if self.is_last:
                return self.lm_head.weight
        return None

    def forward(self, x: Tensor, cu_seqlens: Tensor, positions: Tensor, max_seqlen: int | None = None) -> Tensor:
        activations = x.dtype if self.embed_tokens is None else self.embed_tokens.weight.dtype
        key = (x.device.type, compute_dtype(x.device.type, activations))
        if key not in self._backends:
            self._backends[key] = model_backend(self.cfg, x.device, key[1])
        return self._run(x, positions, VarlenAttention(cu_seqlens, self._backends[key], max_seqlen))

    def forward_cached(self, x: Tensor, cu_seqlens: Tensor, cache: KVCache, slots: Tensor) -> Tensor:
        """Append packed new tokens (N,) of S sequences to cache rows `slots` (S,), like the model's
        forward_cached; `cache` holds this stage's layers only (`new_kv_cache`)."""
        attn = CachedAttention(cache, cu_seqlens, slots)
        start = self.layer_range.start
        out = self._run(x, attn.positions, lambda layer, q, k, v: attn(layer - start, q, k, v))
        attn.commit()
        return out

    def new_kv_cache(self, num_slots: int, max_seq_len: int, *, dtype: torch.dtype | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache(len(self.layers), num_slots, max_seq_len, self.cfg.num_kv_heads, self.cfg.dim_per_head,
                       dtype=dtype or p.dtype, device=p.device)

    def _run(self, x: Tensor, positions: Tensor, attn) -> Tensor:
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        cos, sin = rope_tables(self.inv_freq, positions, x.dtype)
        for layer in self.layers.values():
            x = layer(x, cos, sin, attn)
        return self.norm(x) if self.norm is not None else x


# -- micro-batches and their metadata ------------------------------------------------------------------


@dataclass(frozen=True)
class MicroBatch:
    """One packed micro-batch: input_ids (N,), cu_seqlens (S + 1,), positions (N,), all int64."""

    input_ids: Tensor
    cu_seqlens: Tensor
    positions: Tensor

    @classmethod
    def packed(cls, input_ids: Tensor, cu_seqlens: Tensor, positions: Tensor | None = None) -> "MicroBatch":
        """Positions default to restarting at 0 in every sequence (the packed-training layout)."""
        _check_ids(input_ids, cu_seqlens, "micro-batch")  # before the cast: a float cu_seqlens is an error
        cu = cu_seqlens.to(torch.int64)
        mb = cls(input_ids, cu, packed_positions(cu, input_ids.shape[0]) if positions is None else positions)
        mb.check()
        return mb

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def check(self, i: int | None = None) -> None:
        """Raise ValueError, naming the sizes, unless the three tensors describe one packed batch."""
        where = "micro-batch" if i is None else f"micro-batch {i}"
        _check_ids(self.input_ids, self.cu_seqlens, where)
        n = self.input_ids.shape[0]
        if self.positions.shape != (n,):
            raise ValueError(f"{where}: positions must be (N,) = ({n},), got {tuple(self.positions.shape)}")


def _check_ids(ids: Tensor, cu: Tensor, where: str) -> None:
    if ids.ndim != 1 or ids.shape[0] < 1 or ids.dtype.is_floating_point:
        raise ValueError(f"{where}: input_ids must be a non-empty 1-D integer tensor (N,), "
                         f"got {tuple(ids.shape)} {ids.dtype}")
    n = ids.shape[0]
    if (cu.ndim != 1 or cu.numel() < 2 or cu.dtype.is_floating_point or int(cu[0]) != 0 or int(cu[-1]) != n
            or bool((cu[1:] < cu[:-1]).any())):
        raise ValueError(f"{where}: cu_seqlens must be (S + 1,) integers, non-decreasing from 0 to N = {n}; got "
                         f"shape {tuple(cu.shape)} {cu.tolist()[:8]}")


def _encode(mbs: Sequence[MicroBatch]) -> Tensor:
    """[S_0..S_m-1, N_0..N_m-1, cu_0.., pos_0..] as one int64 tensor."""
    sizes = [mb.cu_seqlens.numel() - 1 for mb in mbs] + [mb.num_tokens for mb in mbs]
    dev = mbs[0].cu_seqlens.device
    parts = [torch.tensor(sizes, dtype=torch.int64, device=dev)]
    parts += [mb.cu_seqlens.to(torch.int64) for mb in mbs] + [mb.positions.to(torch.int64) for mb in mbs]
    return torch.cat(parts)


def _decode(meta: Tensor, m: int) -> list[tuple[int, Tensor, Tensor]]:
    """Inverse of _encode: (N_i, cu_seqlens_i, positions_i) per micro-batch."""
    sizes = meta[: 2 * m].tolist()
    seqs, toks = sizes[:m], sizes[m:]
    cus = torch.split(meta[2 * m: 2 * m + sum(seqs) + m], [s + 1 for s in seqs])
    pos = torch.split(meta[2 * m + sum(seqs) + m:], toks)
    return list(zip(toks, cus, pos))


# -- point-to-point ----------------------------------------------------------------------------------


class _Links:
    """p2p with the neighbouring stages on the pp group (peers as global ranks, which P2POp takes)."""

    def __init__(self, group: dist.ProcessGroup, pp_rank: int, pp: int, device: torch.device):
        if dist.get_world_size(group) != pp or dist.get_rank(group) != pp_rank:
            raise ValueError(f"pp group has size {dist.get_world_size(group)} and this rank is {dist.get_rank(group)} "
                             f"in it; the stage says pp_rank {pp_rank} of pp = {pp}")
        self.group, self.pp_rank, self.device = group, pp_rank, device
        self.prev = dist.get_global_rank(group, pp_rank - 1) if pp_rank > 0 else None
        self.next = dist.get_global_rank(group, pp_rank + 1) if pp_rank < pp - 1 else None
        self.first, self.last = dist.get_global_rank(group, 0), dist.get_global_rank(group, pp - 1)

    def exchange(self, sends: Sequence[tuple[Tensor, int | None]], recvs: Sequence[tuple[Tensor, int | None]]) -> None:
        """Post every send and receive (peer None: skipped) in one batch, then wait for all of them."""
        ops = [dist.P2POp(dist.isend, t, p, self.group) for t, p in sends if p is not None]
        ops += [dist.P2POp(dist.irecv, t, p, self.group) for t, p in recvs if p is not None]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()


def _share_metadata(links: _Links, stage: PipelineStage, mbs: Sequence[MicroBatch] | None,
                    device: torch.device) -> list[tuple[int, Tensor, Tensor]]:
    """Shapes before tensors: the first stage broadcasts every micro-batch's metadata over the pp group.

    A collective, not a relay: log(P) latency, and under NCCL it also creates the group's
    communicator with every rank present before the first point-to-point call (which NCCL requires).
    Micro-batches the first stage rejects are announced (m = -1), so every stage raises, none hangs.
    """
    header = torch.tensor([-1, 0], dtype=torch.int64, device=device)
    if stage.is_first:
        try:
            if not mbs:
                raise ValueError("one_f_one_b: the first stage needs at least one micro-batch")
            for i, mb in enumerate(mbs):
                mb.check(i)
        except ValueError:
            dist.broadcast(header, links.first, group=links.group)
            raise
        meta = _encode(mbs).to(device)
        header = torch.tensor([len(mbs), meta.numel()], dtype=torch.int64, device=device)
    dist.broadcast(header, links.first, group=links.group)
    m, size = header.tolist()
    if m < 0:
        raise ValueError(f"pipeline stage {stage.pp_rank}: the first stage rejected this step's micro-batches "
                         "(see its error)")
    if not stage.is_first:
        meta = torch.empty(size, dtype=torch.int64, device=device)
    dist.broadcast(meta, links.first, group=links.group)
    return _decode(meta, m)


def _agree(links: _Links, problem: str | None) -> None:
    """Raise on every stage if any stage found a problem with its inputs (one all-reduce), never hang."""
    flag = torch.tensor([0 if problem else 1], dtype=torch.int64, device=links.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=links.group)
    if problem:
        raise ValueError(problem)
    if int(flag) == 0:
        raise ValueError(f"pipeline stage {links.pp_rank}: another stage rejected this step's inputs (see its error)")


def _local_problem(stage: PipelineStage, mbs: Sequence[MicroBatch] | None, meta, loss_fn, device) -> str | None:
    """What is wrong with this stage's own inputs to one_f_one_b, if anything."""
    if stage.is_last and loss_fn is None:
        return f"one_f_one_b: the last stage ({stage.pp_rank}) needs a loss_fn"
    tied = stage.tied_weight
    if tied is not None and tied.grad is not None and bool(_local(tied.grad).any()):
        return ("one_f_one_b sums the tied embedding copies' gradients on return: call it once per optimizer "
                "step, with gradients zeroed (or None) before")
    if mbs is not None and not stage.is_first:  # a rank that also loaded the data: it must agree
        if len(mbs) != len(meta) or any(mb.num_tokens != n or not torch.equal(mb.cu_seqlens.to(device), cu)
                                        for mb, (n, cu, _) in zip(mbs, meta)):
            return (f"pipeline stage {stage.pp_rank}: its micro-batches ({[mb.num_tokens for mb in mbs]} tokens) "
                    f"differ from the first stage's ({[n for n, _, _ in meta]} tokens)")
    return None


# -- 1F1B ------------------------------------------------------------------------------------------


def one_f_one_b(stage: PipelineStage, micro_batches: Sequence[MicroBatch] | None,
                loss_fn: Callable[[Tensor, int], Tensor] | None, pp_group: dist.ProcessGroup, *,
                act_dtype: torch.dtype | None = None,
                before_backward: Callable[[int, bool], None] | None = None) -> Tensor | None:
    """Forward and backward of one optimizer step's micro-batches through the pipeline (1F1B).

    micro_batches: required on the first stage; on another stage None, or the same list (then
    checked against the first stage's). loss_fn(hidden (N_i, H), i) -> scalar: micro-batch i's
    share of the globally normalised loss, called on the last stage only. act_dtype: dtype of the
    activations and gradients on the wire, cast to and from the compute dtype at each end (default:
    the parameters' storage dtype; pass the compute dtype, e.g. FSDP2's param_dtype=bf16, to halve
    the traffic under mixed precision). before_backward(i, is_last): called before each backward,
    e.g. to enable the data-parallel gradient reduction only for the step's last (data.set_grad_sync).
    Bad inputs on any stage raise on every stage before any activation moves; a loss_fn that fails
    mid-schedule (a bug, not data) leaves the other stages waiting until the group's timeout.

    Gradients accumulate into the stage's .grad; on return they are the step's complete gradients
    (tied embedding copies summed). Returns the summed loss (detached) on the last stage, None elsewhere.
    """
    param = next(stage.parameters())
    device, dtype = param.device, act_dtype or param.dtype
    links = _Links(pp_group, stage.pp_rank, stage.pp, device)
    meta = _share_metadata(links, stage, micro_batches, device)
    _agree(links, _local_problem(stage, micro_batches, meta, loss_fn, device))
    tied = stage.tied_weight
    m, H = len(meta), stage.cfg.hidden_size
    saved: list[tuple[Tensor | None, Tensor] | None] = [None] * m
    losses: list[Tensor] = []

    def act(i: int) -> Tensor:  # receive buffer for micro-batch i's activation or gradient
        return torch.empty(meta[i][0], H, dtype=dtype, device=device)

    def recv_forward(i: int) -> Tensor | None:
        if stage.is_first:
            return None
        x = act(i)
        links.exchange([], [(x, links.prev)])
        return x

    def forward(i: int, x: Tensor | None) -> Tensor:
        _, cu, pos = meta[i]
        if stage.is_first:
            y = stage(micro_batches[i].input_ids.to(device), cu, pos)
        else:  # x: the leaf in the wire dtype (its .grad goes back), cast to the parameters' dtype
            y = stage(x.requires_grad_(True).to(param.dtype), cu, pos)
        if stage.is_last:
            y = loss_fn(y, i)
            if y.ndim != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(y.shape)} for micro-batch {i}")
            losses.append(y.detach())
        saved[i] = (None if stage.is_first else x, y)
        return y

    def backward(i: int, grad: Tensor | None) -> Tensor | None:
        x, y = saved[i]
        saved[i] = None  # free the activations as soon as the backward has consumed them
        if before_backward is not None:
            before_backward(i, i == m - 1)
        torch.autograd.backward(y, grad_tensors=None if stage.is_last else grad.to(y.dtype))
        return None if x is None else x.grad

    send_next = links.next  # None on the last stage: the sends below become no-ops
    warmup = min(stage.pp - 1 - stage.pp_rank, m)
    for i in range(warmup):
        y = forward(i, recv_forward(i))
        links.exchange([(y.detach().to(dtype), send_next)], [])
    steady = m - warmup
    x = recv_forward(warmup) if steady > 0 else None
    for k in range(steady):
        i = warmup + k  # forward micro-batch i, then backward micro-batch k
        y = forward(i, x)
        g = None if stage.is_last else act(k)
        links.exchange([(y.detach().to(dtype), send_next)], [(g, send_next)])
        dx = backward(k, g)
        if k == steady - 1:
            links.exchange([(dx, links.prev)], [])
        else:
            x = None if stage.is_first else act(i + 1)
            links.exchange([(dx, links.prev)], [(x, links.prev)])
    for k in range(steady, m):
        g = None if stage.is_last else act(k)
        links.exchange([], [(g, send_next)])
        links.exchange([(backward(k, g), links.prev)], [])
    if tied is not None:
        _sum_tied_grads(links, stage, tied)
    if not stage.is_last:
        return None
    # summed in fp64 (m terms), returned in the loss's own dtype
    return torch.stack(losses).sum(dtype=torch.float64).to(losses[0].dtype)


def _sum_tied_grads(links: _Links, stage: PipelineStage, weight: Tensor) -> None:
    """First and last stage swap their tied-embedding gradients and add the other's (works on the local
    shard of an FSDP2 DTensor gradient too: both stages shard the (V, H) matrix the same way)."""
    if weight.grad is None:
        raise RuntimeError(f"pipeline stage {stage.pp_rank}: the tied embedding received no gradient")
    local = _local(weight.grad)
    peer = links.last if stage.is_first else links.first
    other = torch.empty_like(local)
    links.exchange([(local.contiguous(), peer)], [(other, peer)])
    local.add_(other)


def _local(t: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 DTensor (no communication), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


# -- pipelined decode ------------------------------------------------------------------------------


def greedy(logits: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
    """logits (R, V) fp32 -> argmax tokens (R,) and their log-probs z_t - logsumexp(z) (R,), as the Generator."""
    tokens = logits.argmax(-1)
    return tokens, logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logits, -1)


@torch.inference_mode()
def pipelined_decode(stage: PipelineStage, prompts: Sequence[Sequence[int]] | None, pp_group: dist.ProcessGroup, *,
                     max_new_tokens: int, num_groups: int, stop_token_ids: Sequence[int] = (),
                     sampler: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] = greedy,
                     act_dtype: torch.dtype | None = None) -> list[tuple[list[int], list[float]]] | None:
    """Generate up to max_new_tokens per prompt with the stages passing hidden states, num_groups in flight.

    prompts: token ids, on the first stage (None elsewhere). The prompts are dealt round-robin into
    num_groups groups (>= pp keeps every stage busy); each stage caches its own layers. The first
    stage emits a group's chunk (its prompts, then one token per live sequence) and moves on to the
    next group; the last stage picks the next token of each sequence with
    sampler(logits (R, V) fp32, slots (R,) = prompt indices) -> (tokens (R,), log-probs (R,)) and
    sends them back to the first stage, which drops sequences that emitted a stop token (kept in the
    output) or reached max_new_tokens, and re-emits the group. Sends are asynchronous and receives
    happen in emission order, so no stage waits on one that waits on it. act_dtype: hidden states on
    the wire (default: the parameters' dtype). Returns [(token_ids, logprobs)] per prompt on the
    first stage, None elsewhere.
    """
    dec = _Decoder(stage, pp_group, sampler, act_dtype)
    setup = torch.tensor([-1, 0], dtype=torch.int64, device=dec.device)  # -1: the first stage rejected its input
    bad = stage.is_first and (not prompts or any(len(q) < 1 for q in prompts) or max_new_tokens < 1 or num_groups < 1)
    if stage.is_first and not bad:
        setup = torch.tensor([len(prompts), max(map(len, prompts)) + max_new_tokens], device=dec.device)
    dist.broadcast(setup, dec.links.first, group=pp_group)  # slots and cache length; a collective first (NCCL)
    if bad:
        raise ValueError(f"pipelined_decode: needs non-empty prompts ({len(prompts or [])} given, lengths "
                         f"{[len(q) for q in prompts or []][:8]}), max_new_tokens >= 1 (got {max_new_tokens}) "
                         f"and num_groups >= 1 (got {num_groups})")
    if int(setup[0]) < 0:
        raise ValueError(f"pipeline stage {stage.pp_rank}: the first stage rejected the prompts (see its error)")
    dec.cache = stage.new_kv_cache(int(setup[0]), int(setup[1]))
    out = dec.lead(prompts, max_new_tokens, num_groups, set(stop_token_ids)) if stage.is_first else dec.relay()
    for w in dec.sends:
        w.wait()
    return out


class _Decoder:
    """One stage's side of pipelined_decode. Per group emitted, on the wire: header [N, S] (N = -1: end),
    meta [cu_seqlens (S + 1), slots (S)], hidden (N, H) down the chain; tokens (S,) int64 and log-probs
    (S,) fp32 from the last stage back to the first."""

    def __init__(self, stage: PipelineStage, group: dist.ProcessGroup, sampler, act_dtype: torch.dtype | None):
        p = next(stage.parameters())
        self.stage, self.group, self.sampler = stage, group, sampler
        self.device, self.dtype, self.param_dtype = p.device, act_dtype or p.dtype, p.dtype
        self.links = _Links(group, stage.pp_rank, stage.pp, p.device)
        self.sends: list = []
        self.cache: KVCache | None = None

    def send(self, tensors: Sequence[Tensor], peer: int) -> None:
        self.sends = [w for w in self.sends if not w.is_completed()]  # a pending send keeps its tensor alive
        self.sends.extend(dist.isend(t, peer, group=self.group) for t in tensors)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, peer: int) -> Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(t, peer, group=self.group)
        return t

    def run(self, x: Tensor, cu: Tensor, slots: Tensor) -> tuple[Tensor, Tensor] | Tensor:
        """This stage's layers on one group; on the last stage, the group's next tokens and log-probs."""
        if not self.stage.is_first:
            x = x.to(self.param_dtype)  # wire dtype -> compute dtype
        h = self.stage.forward_cached(x, cu, self.cache, slots)
        if not self.stage.is_last:
            return h.to(self.dtype)
        logits = F.linear(h[cu[1:] - 1], self.stage.output_weight).float()  # last position of each chunk
        tokens, logps = self.sampler(logits, slots)
        return tokens.to(torch.int64), logps.float()

    def relay(self) -> None:
        """Stages after the first: run each group as it arrives, until the end marker."""
        links = self.links
        while True:
            header = self.recv((2,), torch.int64, links.prev)
            n, s = header.tolist()
            if n < 0:
                if links.next is not None:
                    self.send([header], links.next)
                return None
            meta = self.recv((2 * s + 1,), torch.int64, links.prev)
            out = self.run(self.recv((n, self.stage.cfg.hidden_size), self.dtype, links.prev), meta[: s + 1],
                           meta[s + 1:])
            self.send(list(out) if self.stage.is_last else [header, meta, out],
                      links.first if self.stage.is_last else links.next)

    def lead(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, num_groups: int,
             stop: set[int]) -> list[tuple[list[int], list[float]]]:
        """The first stage: emit every ready group, else collect the oldest in-flight group's tokens."""
        R, links, dev = len(prompts), self.links, self.device
        out: list[tuple[list[int], list[float]]] = [([], []) for _ in range(R)]
        ready = [list(range(j, R, num_groups)) for j in range(min(num_groups, R))]
        in_flight: list[list[int]] = []  # emitted groups, in emission order (= the order results come back)
        local: list[tuple[Tensor, Tensor]] = []  # results when the first stage is also the last (pp = 1)
        while ready or in_flight:
            if ready:  # emitting before waiting is what keeps the stages busy
                group = ready.pop(0)
                chunks = [list(prompts[r]) if not out[r][0] else out[r][0][-1:] for r in group]
                ids = torch.tensor([t for c in chunks for t in c], dtype=torch.int64, device=dev)
                cu = torch.tensor([0] + [len(c) for c in chunks], dtype=torch.int64, device=dev).cumsum(0)
                slots = torch.tensor(group, dtype=torch.int64, device=dev)
                res = self.run(ids, cu, slots)
                if self.stage.is_last:
                    local.append(res)
                else:
                    header = torch.tensor([ids.numel(), len(group)], dtype=torch.int64, device=dev)
                    self.send([header, torch.cat([cu, slots]), res], links.next)
                in_flight.append(group)
                continue
            group = in_flight.pop(0)
            if self.stage.is_last:
                tokens, logps = local.pop(0)
            else:
                tokens = self.recv((len(group),), torch.int64, links.last)
                logps = self.recv((len(group),), torch.float32, links.last)
            live = []
            for r, t, lp in zip(group, tokens.tolist(), logps.tolist()):
                out[r][0].append(t)
                out[r][1].append(lp)
                if t not in stop and len(out[r][0]) < max_new_tokens:
                    live.append(r)
            if live:
                ready.append(live)
        if links.next is not None:
            self.send([torch.tensor([-1, 0], dtype=torch.int64, device=dev)], links.next)
        return out
