"""Checkpoint I/O of the trainer's model and optimizer, whatever the layout.

    save_state(model, net, opt, path, rt, extra={"step": 100})   # collective under torchrun
    load_state(model, net, opt, path, rt)                         # collective under FSDP2 / pp

`model` is the Transformer, `net` this rank's PipelineStage (the whole model when pp = 1) whose
parameters `opt` (one AdamW group) holds. Files are parallel/checkpoint.py's: any tp layout, loadable
by every layout here, exportable to HF.

One process, DDP, tp: save_checkpoint / load_checkpoint on the model directly. Under FSDP2 each
parameter and Adam moment is a DTensor holding this dp rank's rows, and under pipeline parallelism
each stage holds some layers only, neither of which checkpoint.py handles yet; so every rank
assembles a plain copy of the (tp-local) full model and optimizer: `full_tensor` gathers the dp
rows, and a SUM over the pp group fills each stage's layers into the zeros of the others (the last
stage's copy of a tied embedding is left out: it equals the first stage's). pp rank 0 saves the copy
(dp rank 0 writes). Loading fills such a copy from the files and each rank takes its stage's
parameters and its dp rows back (`distribute_tensor` without communication). The copy costs one
unsharded model + optimizer state per rank while it lives; a DTensor- and stage-aware checkpoint.py
would remove it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from sailor_engine.model import Transformer
from sailor_engine.model.parallelize import parallelize_tp
from sailor_engine.parallel.checkpoint import load_checkpoint, save_checkpoint
from sailor_engine.parallel.pipeline import PipelineStage
from sailor_engine.train.setup import Runtime


def is_fsdp(net: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in net.parameters())


def _direct(net: PipelineStage, rt: Runtime) -> bool:
    return rt.pp == 1 and not is_fsdp(net)


def save_state(model: Transformer, net: PipelineStage, opt: torch.optim.Optimizer, path: str | Path, rt: Runtime,
               extra: dict) -> None:
    if _direct(net, rt):  # net's parameters are the model's
        save_checkpoint(model, path, rt.groups, optimizer=opt, extra=extra)
        return
    plain, plain_opt = _plain_copy(model, opt)
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    mine = dict(_pairs(net, plain))  # plain parameter -> this stage's
    step = next(v for st in opt.state.values() for k, v in st.items() if k == "step")  # equal for all
    with torch.no_grad():
        for q in plain.parameters():
            p = mine.get(q)
            state = opt.state.get(p, {}) if p is not None else {}
            moments = {k: full(v).to("cpu") for k, v in state.items() if torch.is_tensor(v) and v.shape == q.shape}
            q.copy_(full(p).to("cpu")) if p is not None else q.zero_()
            plain_opt.state[q] = {"step": step.detach().clone().cpu(),
                                  **{k: moments.get(k, torch.zeros_like(q)) for k in ("exp_avg", "exp_avg_sq")}}
            if rt.pp > 1:  # each stage's parameters into the zeros of the others
                for t in (q, plain_opt.state[q]["exp_avg"], plain_opt.state[q]["exp_avg_sq"]):
                    _sum_over(t, rt.groups.pp, rt.device)
    if rt.pp == 1:  # FSDP2 alone: collective over the world, dp rank 0 writes
        save_checkpoint(plain, path, rt.groups, optimizer=plain_opt, extra=extra)
    elif rt.pp_rank == 0 and rt.dp_rank == 0:  # every rank holds the whole model: one tp group writes it
        save_checkpoint(plain, path, None, optimizer=plain_opt, extra=extra)
    if rt.groups is not None:
        dist.barrier()


def load_state(model: Transformer, net: PipelineStage, opt: torch.optim.Optimizer, path: str | Path,
               rt: Runtime) -> None:
    if _direct(net, rt):
        load_checkpoint(model, path, optimizer=opt)
        return
    plain, plain_opt = _plain_copy(model, opt)
    load_checkpoint(plain, path, optimizer=plain_opt)
    theirs = dict(plain.named_parameters())

    def rows(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # this rank's part, shaped like `like`
        full = full.to(like.device)
        if isinstance(like, DTensor):
            return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
        return full.clone()

    with torch.no_grad():
        for name, p in net.named_parameters():
            q = theirs[_source(net, name)]
            (p.to_local() if isinstance(p, DTensor) else p).copy_(_local(rows(q, p)))
            opt.state[p] = {k: rows(v, p) if torch.is_tensor(v) and v.shape == q.shape else v
                            for k, v in plain_opt.state[q].items()}
    for g, h in zip(opt.param_groups, plain_opt.param_groups):
        g.update({k: v for k, v in h.items() if k != "params"})


def _source(net: PipelineStage, name: str) -> str:
    """The model parameter a stage parameter comes from (the tied copy: the embedding)."""
    return "embed_tokens.weight" if net.tied_copy and name == "lm_head.weight" else name


def _pairs(net: PipelineStage, plain: Transformer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(plain copy's parameter, this stage's), by name; the last stage's tied copy is left out."""
    theirs = dict(plain.named_parameters())
    return [(theirs[n], p) for n, p in net.named_parameters() if _source(net, n) == n]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _sum_over(t: torch.Tensor, group: dist.ProcessGroup, device: torch.device) -> None:
    buf = t.to(device)
    dist.all_reduce(buf, group=group)
    t.copy_(buf)


def _plain_copy(model: Transformer, opt: torch.optim.Optimizer) -> tuple[Transformer, torch.optim.Optimizer]:
    """A CPU model like `model` (tp-sharded like it, nothing else), and an empty optimizer of opt's
    class and hyper-parameters over all its parameters, in one group (as build_optimizer makes)."""
    if len(opt.param_groups) != 1:
        raise ValueError(f"the trainer's checkpoints hold one optimizer parameter group, got {len(opt.param_groups)}")
    with torch.device("meta"):
        plain = Transformer(model.cfg)
    if model.tp_group is not None:
        parallelize_tp(plain, model.tp_group)
    plain.to_empty(device="cpu")
    plain.reset_buffers("cpu")
    hyper = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    return plain, type(opt)([{**hyper, "params": list(plain.parameters())}])
