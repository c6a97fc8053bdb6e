"""Sharded checkpoints: each tp rank writes its shards; load into any tp layout; export to HF.

    save_checkpoint(model, "ckpt/step-100", groups, optimizer=opt, extra={"step": 100})  # collective
    load_checkpoint(model, "ckpt/step-100", optimizer=opt)   # model at any tp degree, sharded or not
    read_manifest("ckpt/step-100")["extra"]                  # {"step": 100}
    export_hf("ckpt/step-100", "out/hf")                     # one process: a transformers-loadable directory

Layout of a checkpoint directory:

    model-tp00-of-02.safetensors   this rank's parameters under their (HF-style) engine names, and its
    model-tp01-of-02.safetensors   optimizer state as "optim.<param>.<key>" (Adam moments sharded like
                                   their parameter, step counts replicated)
    manifest.json                  format, config, tp degree, extra, optimizer param_groups, and per
                                   tensor its full shape and the block of it each file holds
                                   (dim, start, stop), or null when replicated

Crash safety: every file is written to a temporary name, fsync'ed and renamed into place; the
manifest is written last, the same way, by tp rank 0 once every shard is on disk, and an old
manifest is removed before the first shard is touched. A directory without manifest.json is an
incomplete checkpoint and is refused. A save into a directory a killed save left behind first
removes that save's temporary files (a shard each: model and optimizer state); `remove_checkpoint`
deletes the manifest before anything else, so a deletion cut short never leaves a directory that
looks complete.

Loading reads, for each parameter, only the parts of the saved blocks that overlap the block this
rank needs (`safe_open(...).get_slice`), so tp=2 -> tp=1, tp=1 -> tp=2 and anything else with the
same model config work. Of dp replicas only dp rank 0 writes; kv heads replicated over tp ranks are
saved by each (a few small tensors) and read once.

Scope: parameters and any optimizer whose per-parameter state is tensors shaped like the parameter
or scalars (SGD, Adam, AdamW; others are refused by name); data-loader and RNG state go in `extra`
or belong to the trainer. Tensor parallelism with any number of replicated dp ranks (dp rank 0
writes); pipeline stages and FSDP-sharded (DTensor) parameters are not handled here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import msgspec
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from sailor_engine.model.config import ModelConfig
from sailor_engine.model.hf import save_hf
from sailor_engine.model.parallelize import shard_plan
from sailor_engine.model.transformer import Transformer
from sailor_engine.parallel.dims import ParallelGroups
from sailor_engine.parallel.layers import Shard

FORMAT = "sailor-engine/tp-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"


def save_checkpoint(model: Transformer, path: str | Path, groups: ParallelGroups | None = None, *,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None) -> None:
    """Write this rank's parameters (and optimizer state) and, on tp rank 0, the manifest.

    Collective when distributed: every rank of the world calls it (groups given), or every rank of
    the model's tp group. optimizer: its per-parameter state is saved in the parameters' layout (so
    it reshards on load too), its param_groups in the manifest. extra: JSON-serialisable metadata
    (step, data position), returned by read_manifest(path)["extra"].
    """
    path = Path(path)
    if groups is not None and groups.dims.pp > 1:
        raise ValueError(f"save_checkpoint: pipeline stages (pp={groups.dims.pp}) are not supported yet; save with pp=1")
    group = model.tp_group
    tp = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    writer = groups is None or groups.dp_rank == 0
    fname = f"model-tp{rank:02d}-of-{tp:02d}.safetensors"
    plan = shard_plan(model)
    tensors, entries = {}, {}

    def add(tkey: str, t: torch.Tensor, shard: Shard | None, **info) -> None:
        tensors[tkey] = t.detach().contiguous().cpu()
        entries[tkey] = {"shape": _full_shape(t, shard), "dtype": str(t.dtype).removeprefix("torch."),
                        "block": None if shard is None else [shard.dim, shard.start, shard.stop], **info}

    for name, p in model.named_parameters():
        add(name, p, plan.get(name))
    optim_meta = None
    if optimizer is not None:
        names = _optimizer_names(model, optimizer)
        sd = optimizer.state_dict()
        scalars: dict[str, dict] = {}
        for idx, state in sd["state"].items():
            name = names[idx]
            p, shard = model.get_parameter(name), plan.get(name)
            for k, v in state.items():
                if not torch.is_tensor(v):
                    scalars.setdefault(name, {})[k] = v
                elif v.shape == p.shape:  # Adam moments, momentum: laid out like the parameter
                    add(f"optim.{name}.{k}", v, shard, param=name, key=k, like_param=True)
                elif v.numel() == 1 or shard is None:  # a step count, or any state of a replicated parameter
                    add(f"optim.{name}.{k}", v, None, param=name, key=k, like_param=False)
                else:
                    raise ValueError(f"save_checkpoint: optimizer state {k!r} of the sharded parameter "
                                     f"{name} has shape {tuple(v.shape)}, not the parameter's "
                                     f"{tuple(p.shape)}: its layout across tp ranks is unknown")
        optim_meta = {"param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                        "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]],
                      "scalars": scalars}
    # everything is validated: now touch the disk
    if writer and rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)  # from here on the directory is "incomplete"
        for stale in path.glob(".*.tmp-*"):  # a killed save's (atomic_write): no rank writes before the barrier
            stale.unlink()
    _barrier(groups, group)
    if writer:
        atomic_write(path / fname, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    everyone = [(fname, entries)]
    if group is not None:
        everyone = [None] * tp
        dist.all_gather_object(everyone, (fname, entries), group=group)
    _barrier(groups, group)  # every shard is on disk before the manifest says so
    if writer and rank == 0:
        records: dict[str, dict] = {}
        for f, ent in everyone:
            for key, e in ent.items():
                e = dict(e)
                block = e.pop("block")
                rec = records.setdefault(key, {**e, "blocks": []})
                if rec["shape"] != e["shape"]:
                    raise RuntimeError(f"save_checkpoint: ranks disagree on the full shape of {key}")
                rec["blocks"].append({"file": f, "block": block})
        manifest = {"format": FORMAT, "version": VERSION, "tp": tp, "config": msgspec.to_builtins(model.cfg),
                    "extra": extra or {},
                    "params": {k: r for k, r in records.items() if not k.startswith("optim.")}}
        if optim_meta is not None:
            manifest["optim"] = {**optim_meta, "tensors": {k: r for k, r in records.items() if k.startswith("optim.")}}
        text = json.dumps(manifest, indent=1) + "\n"
        atomic_write(path / MANIFEST, lambda tmp: Path(tmp).write_text(text))
        _fsync_dir(path)
    _barrier(groups, group)  # nobody reads before the manifest exists


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint directory, its manifest first: if this is cut short, what is left is incomplete."""
    path = Path(path)
    (path / MANIFEST).unlink(missing_ok=True)
    _fsync_dir(path)
    shutil.rmtree(path)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise FileNotFoundError(f"{path}: no {MANIFEST}: not a checkpoint, or an incomplete one (interrupted save)")
    m = json.loads((path / MANIFEST).read_text())
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ValueError(f"{path / MANIFEST}: format {m.get('format')!r} v{m.get('version')}, "
                         f"expected {FORMAT!r} v{VERSION}")
    return m


def checkpoint_config(path: str | Path) -> ModelConfig:
    return msgspec.convert(read_manifest(path)["config"], ModelConfig)


@torch.no_grad()
def load_checkpoint(model: Transformer, path: str | Path, *, optimizer: torch.optim.Optimizer | None = None,
                    assign: bool = False) -> Transformer:
    """Fill `model` (any tp degree) from a checkpoint saved at any tp degree with the same config.

    optimizer: also restore its state and param_groups (lr, betas, ...); it must hold the model's
    parameters in the same groups as the saved one. assign=True replaces the parameters (for a
    model built on the meta device); otherwise they are copied into, keeping device and dtype.
    """
    path = Path(path)
    m = read_manifest(path)
    saved = msgspec.convert(m["config"], ModelConfig)
    if saved != model.cfg:
        diff = [f for f in ModelConfig.__struct_fields__ if getattr(saved, f) != getattr(model.cfg, f)]
        raise ValueError(f"{path}: the checkpoint's model config differs from the model's in {', '.join(diff)}")
    plan = shard_plan(model)
    names = [n for n, _ in model.named_parameters()]
    if set(names) != set(m["params"]):
        missing, extra = set(names) - set(m["params"]), set(m["params"]) - set(names)
        raise ValueError(f"{path}: parameters missing from the checkpoint {sorted(missing)[:5]}, "
                         f"unknown to the model {sorted(extra)[:5]}")
    if optimizer is not None and "optim" not in m:
        raise ValueError(f"{path}: the checkpoint holds no optimizer state")
    handles: dict[str, object] = {}
    try:
        state = {}
        for name, p in model.named_parameters():
            t = _read(path, handles, name, m["params"][name], p, plan.get(name))
            if assign:
                state[name] = t
            else:
                p.copy_(t)  # one tensor at a time: no second copy of the model in host memory
        if assign:
            model.load_state_dict(state, strict=True, assign=True)
            model.reset_buffers("cpu")
        if optimizer is not None:
            optimizer.load_state_dict(_optimizer_state(path, handles, m["optim"], model, optimizer, plan))
    finally:
        handles.clear()
    return model


def export_hf(path: str | Path, out: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Assemble the full model of a checkpoint (any tp layout) and write an HF directory (one process)."""
    with torch.device("meta"):
        model = Transformer(checkpoint_config(path))
    save_hf(load_checkpoint(model, path, assign=True), out, dtype=dtype)


# -- internals ---------------------------------------------------------------------------------


def _read(path: Path, handles: dict, key: str, rec: dict, p: torch.Tensor, want: Shard | None) -> torch.Tensor:
    """Tensor `key` for a local tensor shaped like `p` holding block `want` (None: all) of the full one."""
    full = _full_shape(p, want)
    if rec["shape"] != full:
        raise ValueError(f"{path}: {key} has full shape {rec['shape']} in the checkpoint, {full} in the model")
    t = _read_block(path, handles, key, rec, want)
    if t.shape != p.shape:
        raise ValueError(f"{path}: {key} reads as {tuple(t.shape)}, the model holds {tuple(p.shape)}")
    return t


def _optimizer_names(model: Transformer, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (the indices of its state_dict)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in name_of:
                raise ValueError(f"the optimizer holds a tensor {tuple(p.shape)} that is not a parameter of the model")
            names.append(name_of[id(p)])
    return names


def _optimizer_state(path: Path, handles: dict, saved: dict, model: Transformer, optimizer, plan) -> dict:
    """The optimizer state_dict of this rank's layout, read from the saved one."""
    names = _optimizer_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    current = []
    i = 0
    for g in optimizer.param_groups:
        current.append(names[i:i + len(g["params"])])
        i += len(g["params"])
    if [g["params"] for g in saved["param_groups"]] != current:
        raise ValueError(f"{path}: the optimizer's parameter groups differ from the saved ones "
                         f"({[len(c) for c in current]} vs {[len(g['params']) for g in saved['param_groups']]} "
                         "parameters per group, or another order)")
    state: dict[int, dict] = {}
    for key, rec in saved["tensors"].items():
        name, k = rec["param"], rec["key"]
        if rec["like_param"]:  # this rank's block of it, as of the parameter
            like, want = model.get_parameter(name), plan.get(name)
        else:
            like, want = torch.empty(rec["shape"], device="meta"), None
        state.setdefault(index[name], {})[k] = _read(path, handles, key, rec, like, want)
    for name, scalars in saved["scalars"].items():
        state.setdefault(index[name], {}).update(scalars)
    groups = []
    for g, cur in zip(saved["param_groups"], optimizer.param_groups):
        # JSON has no tuples: give back the optimizer's own type (betas)
        g = {k: tuple(v) if isinstance(v, list) and isinstance(cur.get(k), tuple) else v for k, v in g.items()}
        groups.append({**g, "params": [index[n] for n in g["params"]]})
    return {"state": state, "param_groups": groups}


def _full_shape(p: torch.Tensor, shard: Shard | None) -> list[int]:
    return [shard.size if shard is not None and i == shard.dim else n for i, n in enumerate(p.shape)]


def _read_block(path: Path, handles: dict, name: str, rec: dict, want: Shard | None) -> torch.Tensor:
    """The part `want` (None: all) of parameter `name`'s full tensor, from the saved blocks."""
    def f(fname):
        if fname not in handles:
            handles[fname] = safe_open(path / fname, framework="pt")
        return handles[fname]

    def sl(fname):
        return f(fname).get_slice(name)

    blocks = rec["blocks"]
    if blocks[0]["block"] is None:  # saved replicated: any file holds it whole
        first = blocks[0]["file"]
        return f(first).get_tensor(name) if want is None else want.read(sl(first))
    dim = blocks[0]["block"][0]
    size = rec["shape"][dim]
    lo, hi = (0, size) if want is None or want.dim != dim else (want.start, want.stop)
    pieces, covered = [], lo
    for b in sorted(blocks, key=lambda b: b["block"][1]):  # replicas share a start: the first is taken
        _, start, stop = b["block"]
        if stop <= covered or start > covered or covered >= hi:
            continue
        a, z = covered - start, min(stop, hi) - start  # the overlap, in the saved block's coordinates
        pieces.append(Shard(dim, a, z, stop - start).read(sl(b["file"])))
        covered = start + z
    if covered != hi:
        raise ValueError(f"{path}: the saved blocks of {name} do not cover [{lo}, {hi}) along dim {dim}")
    t = torch.cat(pieces, dim)
    if want is not None and want.dim != dim:  # sharded along another dim than saved: cut from the whole
        t = want.take(t)
    return t


def atomic_write(dest: Path, write) -> None:
    """write(tmp) then fsync and rename onto dest: readers see the old file or the whole new one."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(groups: ParallelGroups | None, group) -> None:
    if groups is not None or group is not None:
        dist.barrier(group=None if groups is not None else group)
