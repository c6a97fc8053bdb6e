"""Data parallelism on the dp axis: FSDP2 `fully_shard` or DDP, with gradients summed, not averaged.

Every loss in the engine is normalised by counts over the whole optimizer step (all micro-batches
on all dp ranks, all-reduced over dp before any backward: `global_norm` in rl/loss.py, reused here
for supervised RFT batches). Each rank's gradient is then already its share of the full-batch
gradient, so the dp reduction must SUM: FSDP2 gets a divide factor of 1 with sum-only collectives
(reduce-scatter SUM, no pre/post division), DDP a comm hook that all-reduces with SUM. The dp=2
result then equals the single-process gradient on the concatenated batch, whatever each rank's
token count (averaging would weight a rank with few tokens as much as one with many).

    model = data_parallel(PipelineStage(model, range(L), 0, 1), groups.dp, mode="fsdp")
    batches = [pack(seqs) for seqs in my_micro_batches]
    norm = global_norm([b.loss_mask for b in batches], [b.seq_ids for b in batches], dp_group=groups.dp)
    for i, b in enumerate(batches):
        with grad_sync(model, i == len(batches) - 1):          # reduce once, after the last backward
            hidden = model(b.input_ids, b.cu_seqlens, packed_positions(b.cu_seqlens, b.num_tokens))
            logp = fused_linear_logprob(hidden, unwrap(model).output_weight, b.targets)
            rft_loss(logp, b.loss_mask, norm).backward()

Parameters must be identical on every dp rank before wrapping (same seed, or a loaded checkpoint):
DDP broadcasts rank 0's, FSDP2 keeps this rank's slice of its own copy. FSDP2 shards every decoder
layer and then the root (embedding, final norm, LM head); its gradients are DTensor shards
(`.full_tensor()` gathers one). FSDP2 runs on CPU with gloo in torch 2.13 (reduce-scatter and
all-gather over gloo), so both modes are tested there; under pipeline parallelism use FSDP2, since
DDP decides at forward time whether a backward reduces and 1F1B interleaves forwards and backwards.

FSDP2 all-gathers parameters in every forward and backward, so every dp rank must run the same
number of micro-batches (their token counts may differ freely): `check_micro_batches` turns a
mismatch into an error naming the counts instead of a hang. DDP only communicates in the last
backward and accepts different counts.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from sailor_engine.model.transformer import DecoderLayer
from sailor_engine.rl.loss import LossNorm, aggregate

MODES = ("fsdp", "ddp")
# torch 2.13 renamed DDP's broadcast_buffers to forward_sync_buffers (and warns on the old name);
# torch 2.11 (the GPU hosts) has only the old one. Detected once.
_NO_BUFFER_SYNC = ("forward_sync_buffers" if "forward_sync_buffers" in
                   inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")


def data_parallel(module: nn.Module, dp_group: dist.ProcessGroup, *, mode: str = "fsdp",
                  reshard_after_forward: bool = True, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """Wrap `module` (a PipelineStage, or any module) for data parallelism over dp_group, summing gradients.

    mode "fsdp": fully_shard each DecoderLayer, then the root, in place; returns the module.
    reshard_after_forward: free the gathered layer weights after forward (False under pipeline
    parallelism, where several forwards run before their backwards). mp_policy: FSDP2 mixed precision.
    mode "ddp": returns a DistributedDataParallel wrapper (`unwrap` gives the module back).
    """
    if mode not in MODES:
        raise ValueError(f"parallel.data_parallel must be one of {MODES}, got {mode!r}")
    device_type = next(module.parameters()).device.type
    if mode == "ddp":
        if mp_policy is not None:
            raise ValueError("mp_policy is an FSDP2 option; DDP trains in the module's own dtype")
        # No per-forward buffer broadcast: the only buffers (RoPE inv_freq) are derived from the config.
        ddp = DistributedDataParallel(module, process_group=dp_group, **{_NO_BUFFER_SYNC: False})
        ddp.register_comm_hook(dp_group, _allreduce_sum)
        return ddp
    mesh = DeviceMesh.from_group(dp_group, device_type)
    kw = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    for sub in module.modules():
        if isinstance(sub, DecoderLayer):
            fully_shard(sub, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(module, **kw)
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            # Sum, never average: the loss is globally normalised. Sum-only collectives with factor 1
            # do no division at all (not even NCCL's PreMulSum with 1.0, which gloo lacks).
            sub.set_gradient_divide_factor(1.0)
            sub.set_force_sum_reduction_for_comms(True)
    return module


def check_micro_batches(count: int, dp_group: dist.ProcessGroup) -> None:
    """Raise ValueError on every rank unless all dp ranks run `count` micro-batches (one small all_gather)."""
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(dp_group) == "nccl" else "cpu"
    counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(dist.get_world_size(dp_group))]
    dist.all_gather(counts, torch.tensor([count], dtype=torch.int64, device=dev), group=dp_group)
    counts = [int(c) for c in counts]
    if len(set(counts)) > 1:
        raise ValueError(f"dp ranks run different numbers of micro-batches {counts}; FSDP2 gathers parameters "
                         "in every forward and backward, so each rank must run the same number")


def _allreduce_sum(group, bucket):
    """DDP comm hook (group, GradBucket) -> Future[Tensor]: all-reduce the bucket with SUM (DDP's default
    divides by the dp size). Unannotated: DDP checks the annotation object, and `from __future__ import
    annotations` would hand it a string."""
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (an FSDP2 module is its own)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


@contextlib.contextmanager
def grad_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: reduce gradients over dp only if `enabled`.

    Disable it for every micro-batch but the step's last: gradients accumulate locally (unsharded
    under FSDP2) and are reduced once. A plain module (dp = 1) ignores it.
    """
    if isinstance(module, DistributedDataParallel):
        with contextlib.nullcontext() if enabled else module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def gathered(module: nn.Module, *, layers_reshard_after_forward: bool = True) -> Iterator[None]:
    """Inside: `module`'s parameters are whole on every dp rank, for running it outside training
    (colocated generation). A plain or DDP module already is: nothing happens.

    FSDP2: entering all-gathers every FSDP2 module's parameters (a collective: all dp ranks enter
    together) and stops forwards from freeing them, so the forwards inside, any number, per rank,
    communicate nothing: dp ranks may run different episodes for different times. While gathered the
    parameters are plain tensors (FSDP2 swaps them in), so code that reads them directly works too.
    Exiting frees them again and restores data_parallel's layout: layers reshard after forward
    (`layers_reshard_after_forward`, False under pipeline parallelism), the root does not.
    Costs a whole copy of the weights per rank for the duration."""
    fsdp = [m for m in module.modules() if isinstance(m, FSDPModule)]  # the root first (pre-order)
    if fsdp:
        # FSDP2 makes the first module to run forward the root; a layer called alone inside (the
        # generator's module path) must not become one. Private, and a no-op once initialised.
        fsdp[0]._get_fsdp_state()._lazy_init()
    for m in fsdp:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp:
            if m is not module:
                m.set_reshard_after_forward(layers_reshard_after_forward, recurse=False)
            m.reshard()


def set_grad_sync(module: nn.Module, enabled: bool) -> None:
    """Before a backward, when forward and backward are apart (1F1B's before_backward hook): FSDP2 only."""
    if isinstance(module, DistributedDataParallel):
        raise ValueError("DDP fixes at forward time whether a backward reduces; with pipeline parallelism "
                         "use parallel.data_parallel = 'fsdp'")
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)


def rft_loss(logp: Tensor, loss_mask: Tensor, norm: LossNorm, *, mode: str = "token-mean",
             seq_ids: Tensor | None = None, num_seqs: int | None = None) -> Tensor:
    """Supervised (RFT) loss of one micro-batch: -log p of the policy tokens, aggregated against the
    step's global counts (`global_norm`), so micro-batch losses sum to the full-batch loss.

    logp, loss_mask: (N,) packed or (B, T); mode: an rl.loss aggregation mode, token-mean by default
    (one mean over all loss tokens of the step, as WebSailor's RFT). Computed in fp32.
    """
    return aggregate(-logp, loss_mask, norm, mode, seq_ids=seq_ids, num_seqs=num_seqs)
