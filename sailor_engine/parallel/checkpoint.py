"""Sharded model checkpoints: each tp rank writes its shards; load into any tp layout; export to HF.

    save_checkpoint(model, "ckpt/step-100", groups)     # every rank calls it (collective over the world)
    load_checkpoint(model, "ckpt/step-100")             # model at any tp degree, sharded or not
    export_hf("ckpt/step-100", "out/hf")                # one process: a transformers-loadable directory

Layout of a checkpoint directory:

    model-tp00-of-02.safetensors   this rank's parameters, under their (HF-style) engine names
    model-tp01-of-02.safetensors
    manifest.json                  format, config, tp degree, and per parameter its full shape and
                                   the block of it each file holds (dim, start, stop), or "replicated"

Crash safety: every file is written to a temporary name, fsync'ed and renamed into place; the
manifest is written last, the same way, by tp rank 0 once every shard is on disk, and an old
manifest is removed before the first shard is touched. A directory without manifest.json is an
incomplete checkpoint and is refused. Loading reads, for each parameter, only the parts of the
saved blocks that overlap the block this rank needs (`safe_open(...).get_slice`), so tp=2 -> tp=1,
tp=1 -> tp=2 and anything else with the same model config work. Of dp replicas only dp rank 0
writes; kv heads replicated over tp ranks are saved by each (a few small tensors) and read once.

Scope: the model's parameters (the optimizer and data-loader state belong to the trainer);
tensor parallelism with any number of dp replicas (dp rank 0 writes); pipeline stages are refused.
"""

from __future__ import annotations

import json
import os
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


def save_checkpoint(model: Transformer, path: str | Path, groups: ParallelGroups | None = None) -> None:
    """Write this rank's parameters and, on tp rank 0, the manifest. Collective when distributed."""
    path = Path(path)
    if groups is not None and groups.dims.pp > 1:
        raise NotImplementedError(f"save_checkpoint: pipeline stages (pp={groups.dims.pp}) are not supported")
    group = model.tp_group
    tp = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    writer = groups is None or groups.dp_rank == 0
    if writer and rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)  # from here on the directory is "incomplete"
    _barrier(groups, group)
    name = f"model-tp{rank:02d}-of-{tp:02d}.safetensors"
    plan = shard_plan(model)
    entries = {}
    for pname, p in model.named_parameters():
        s = plan.get(pname)
        entries[pname] = {"shape": _full_shape(p, s), "block": None if s is None else [s.dim, s.start, s.stop]}
    if writer:
        tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()}
        _atomic(path / name, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    everyone = [None] * tp
    if group is not None:
        dist.all_gather_object(everyone, (name, entries), group=group)
    else:
        everyone = [(name, entries)]
    _barrier(groups, group)  # every shard is on disk before the manifest says so
    if writer and rank == 0:
        params = {}
        for fname, ent in everyone:
            for pname, e in ent.items():
                rec = params.setdefault(pname, {"shape": e["shape"], "dtype": str(model.get_parameter(pname).dtype),
                                                "blocks": []})
                if rec["shape"] != e["shape"]:
                    raise RuntimeError(f"save_checkpoint: ranks disagree on the full shape of {pname}")
                rec["blocks"].append({"file": fname, "block": e["block"]})
        manifest = {"format": FORMAT, "version": VERSION, "tp": tp,
                    "config": msgspec.to_builtins(model.cfg), "params": params}
        text = json.dumps(manifest, indent=1) + "\n"
        _atomic(path / MANIFEST, lambda tmp: Path(tmp).write_text(text))
        _fsync_dir(path)
    _barrier(groups, group)  # nobody reads before the manifest exists


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
def load_checkpoint(model: Transformer, path: str | Path, *, assign: bool = False) -> Transformer:
    """Fill `model` (any tp degree) from a checkpoint saved at any tp degree with the same config.

    assign=True replaces the parameters (for a model built on the meta device); otherwise they are
    copied into in place, keeping their device and dtype.
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
    handles: dict[str, object] = {}
    try:
        state = {}
        for name, p in model.named_parameters():
            rec, want = m["params"][name], plan.get(name)
            full = _full_shape(p, want)
            if rec["shape"] != full:
                raise ValueError(f"{path}: {name} has full shape {rec['shape']} in the checkpoint, {full} in the model")
            t = _read_block(path, handles, name, rec, want)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{path}: {name} reads as {tuple(t.shape)}, the model holds {tuple(p.shape)}")
            if assign:
                state[name] = t
            else:
                p.copy_(t)
        if assign:
            model.load_state_dict(state, strict=True, assign=True)
            model.reset_buffers("cpu")
    finally:
        handles.clear()
    return model


def export_hf(path: str | Path, out: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Assemble the full model of a checkpoint (any tp layout) and write an HF directory (one process)."""
    with torch.device("meta"):
        model = Transformer(checkpoint_config(path))
    save_hf(load_checkpoint(model, path, assign=True), out, dtype=dtype)


# -- internals ---------------------------------------------------------------------------------


def _full_shape(p: torch.Tensor, shard: Shard | None) -> list[int]:
    return [shard.size if shard is not None and i == shard.dim else n for i, n in enumerate(p.shape)]


def _read_block(path: Path, handles: dict, name: str, rec: dict, want: Shard | None) -> torch.Tensor:
    """The part `want` (None: all) of parameter `name`'s full tensor, from the saved blocks."""
    def sl(fname):
        if fname not in handles:
            handles[fname] = safe_open(path / fname, framework="pt")
        return handles[fname].get_slice(name)

    blocks = rec["blocks"]
    if blocks[0]["block"] is None:  # saved replicated: any file holds it whole
        s = sl(blocks[0]["file"])
        return s[:] if want is None else want.read(s)
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


def _atomic(dest: Path, write) -> None:
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
