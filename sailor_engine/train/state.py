"""Checkpoint I/O of the trainer's model and optimizer, whatever the data-parallel mode.

    save_state(model, opt, path, groups, extra={"step": 100})   # collective under torchrun
    load_state(model, opt, path)                                 # collective under FSDP2

Without FSDP2 (one process, DDP, tp) these are parallel/checkpoint.py's save_checkpoint and
load_checkpoint. Under FSDP2 each parameter and each Adam moment is a DTensor holding this dp rank's
rows, which checkpoint.py does not handle yet; so here every dp rank assembles the tp-local full
tensors (one all-gather each, `full_tensor`) into a plain copy of the model and optimizer, which
checkpoint.py saves (dp rank 0 writes); loading fills such a copy from the files and gives each dp
rank its rows back (`distribute_tensor` without communication: every rank holds the whole tensor).
The copy costs one unsharded model + optimizer state per rank while it lives: fine for the models
FSDP is used for on a few devices, and what a DTensor-aware checkpoint.py would remove.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from sailor_engine.model import Transformer
from sailor_engine.model.parallelize import parallelize_tp
from sailor_engine.parallel.checkpoint import load_checkpoint, save_checkpoint
from sailor_engine.parallel.dims import ParallelGroups


def is_fsdp(model: Transformer) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def save_state(model: Transformer, opt: torch.optim.Optimizer, path: str | Path, groups: ParallelGroups | None,
               extra: dict) -> None:
    if not is_fsdp(model):
        save_checkpoint(model, path, groups, optimizer=opt, extra=extra)
        return
    plain, plain_opt = _plain_copy(model, opt)
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    with torch.no_grad():
        for p, q in _pairs(model, plain):
            q.copy_(full(p))
            if p in opt.state:
                plain_opt.state[q] = {k: full(v).clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
    save_checkpoint(plain, path, groups, optimizer=plain_opt, extra=extra)


def load_state(model: Transformer, opt: torch.optim.Optimizer, path: str | Path) -> None:
    if not is_fsdp(model):
        load_checkpoint(model, path, optimizer=opt)
        return
    plain, plain_opt = _plain_copy(model, opt)
    load_checkpoint(plain, path, optimizer=plain_opt)

    def rows(full: torch.Tensor, like: DTensor) -> DTensor:  # this rank's rows, as the parameter's DTensor
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)

    with torch.no_grad():
        for p, q in _pairs(model, plain):
            p.to_local().copy_(rows(q, p).to_local())
            if q in plain_opt.state:
                opt.state[p] = {k: rows(v, p) if torch.is_tensor(v) and v.shape == q.shape else v
                                for k, v in plain_opt.state[q].items()}
    for g, h in zip(opt.param_groups, plain_opt.param_groups):
        g.update({k: v for k, v in h.items() if k != "params"})


def _pairs(model: Transformer, plain: Transformer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(model's parameter, the plain copy's) by name."""
    theirs = dict(plain.named_parameters())
    return [(p, theirs[n]) for n, p in model.named_parameters()]


def _plain_copy(model: Transformer, opt: torch.optim.Optimizer) -> tuple[Transformer, torch.optim.Optimizer]:
    """An unsharded (over dp; tp-sharded like `model`) CPU model, and an empty optimizer of the same
    class, groups and hyper-parameters over its parameters, in the same order as model.parameters()."""
    with torch.device("meta"):
        plain = Transformer(model.cfg)
    if model.tp_group is not None:
        parallelize_tp(plain, model.tp_group)
    plain.to_empty(device="cpu")
    plain.reset_buffers("cpu")
    twin = {id(p): q for p, q in _pairs(model, plain)}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [twin[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    return plain, type(opt)(groups)
