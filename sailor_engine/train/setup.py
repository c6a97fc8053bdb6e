"""What a training run is built from, per layout: the process groups, the RFT data, the model and its optimizer.

    rt = init_runtime(cfg)                         # torchrun: process group + ParallelGroups; else one process
    data = load_rft_data(cfg.train.data_dir, cfg)  # expert trajectories rendered to (ids, loss mask), + tokenizer size
    model = build_model(cfg, data.vocab_size, rt)  # random init (same seed everywhere) or init_from; tp-sharded
    stage = wrap_model(model, cfg, rt)             # this rank's pipeline stage, under FSDP2 / DDP when dp > 1
    opt = build_optimizer(unwrap(stage).parameters(), cfg)

Every problem a user can fix in the config or the data (a layout the world size cannot hold, a
missing data_dir, a batch larger than the data, a parallel feature not wired yet) raises ConfigError
naming the field, before any compute, so the entry point exits 2 with the message on every rank.

Precision (train.dtype; auto is bf16 on CUDA, fp32 on CPU; bfloat16 forces it, on CPU too): parameters,
gradients and AdamW state stay fp32 (the master weights); `rt.autocast()` runs a forward under
torch.autocast(bf16): the linears take bf16 inputs (fp32 accumulation), SDPA and FlexAttention cast
q, k, v to bf16, while the residual stream, the RMSNorms and the loss stay fp32. The LM head is the
fused log-prob kernel, which autocast does not see: `rt.head_inputs(hidden, weight)` hands it both
in bf16 (as autocast would a linear), and the kernel keeps the log-softmax and its output in fp32,
which the losses need (exp(logp - old_logp) is a ratio). Backwards run outside autocast (torch's
advice; on CPU an enclosing autocast would also downcast the backward's matmuls); gradients reach
the fp32 parameters through the casts. RL rollouts stay fp32 (rl.run_update says why). Under
autocast the model picks its attention backend for the autocast dtype (flash-attn on CUDA when
installed) and hands flash-attn / xformers q, k, v cast to it.

Not wired yet, and refused by name: sequence parallelism. With pipeline stages every rank still builds (or loads) the whole model and keeps
only its stage's layers: fine for the sizes tested here, a meta-device build is the next step.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import msgspec
import torch
import torch.distributed as dist
from torch import nn

from sailor_engine.config import Config, ConfigError
from sailor_engine.model import Tokenizer, Transformer, load_hf
from sailor_engine.model.parallelize import check_tp_layout, load_hf_tp, parallelize_tp
from sailor_engine.parallel.checkpoint import MANIFEST, checkpoint_config, load_checkpoint
from sailor_engine.parallel.data import data_parallel
from sailor_engine.parallel.dims import ParallelDims, ParallelGroups
from sailor_engine.parallel.pipeline import PipelineStage, stage_layers
from sailor_engine.rollout.format import ChatTemplate
from sailor_engine.synth.expert import Trajectory
from sailor_engine.synth.pipeline import read_jsonl
from sailor_engine.train.batching import Sequence


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its groups (None without torchrun), global rank, device, and the dtype
    its forwards compute in (`compute_dtype`: bf16 under autocast, None for plain fp32)."""

    groups: ParallelGroups | None
    rank: int
    device: torch.device
    compute_dtype: torch.dtype | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh context to run one forward in: torch.autocast(compute_dtype) on this device, or none."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def head_inputs(self, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (N, H) and the LM head weight (V, H) in the compute dtype, for fused_linear_logprob.

        The kernel requires one dtype and is invisible to autocast; bf16 here is autocast's choice for a
        linear (the final norm hands over fp32 hidden). Its logits accumulate in fp32 and its log-probs
        are fp32, so the loss math is fp32 either way; the weight's gradient reaches the fp32 master
        through the cast."""
        if self.compute_dtype is None:
            return hidden, weight
        return hidden.to(self.compute_dtype), weight.to(self.compute_dtype)

    def autocast_calls(self, module: nn.Module):
        """`module` itself in fp32; else a stand-in whose calls run under autocast, every other attribute
        being the module's. For a schedule that calls the module between backwards of its own
        (one_f_one_b): its forwards are autocast, its backwards are not."""
        return module if self.compute_dtype is None else _AutocastCalls(module, self)

    @property
    def dp(self) -> int:
        return 1 if self.groups is None else self.groups.dims.dp

    @property
    def tp(self) -> int:
        return 1 if self.groups is None else self.groups.dims.tp

    @property
    def dp_rank(self) -> int:
        return 0 if self.groups is None else self.groups.dp_rank

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return None if self.groups is None or self.groups.dims.dp == 1 else self.groups.dp

    @property
    def pp(self) -> int:
        return 1 if self.groups is None else self.groups.dims.pp

    @property
    def pp_rank(self) -> int:
        return 0 if self.groups is None else self.groups.pp_rank


class _AutocastCalls:
    def __init__(self, module: nn.Module, rt: Runtime):
        self._module, self._rt = module, rt

    def __call__(self, *args, **kwargs):
        with self._rt.autocast():
            return self._module(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def init_runtime(cfg: Config) -> Runtime:
    """Under torchrun (WORLD_SIZE set): check the layout, init the process group, build the groups."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        dims = ParallelDims.resolve(cfg.parallel, world)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_wired(cfg, dims)
    cuda = torch.cuda.is_available()
    dtype = compute_dtype(cfg, torch.device("cuda" if cuda else "cpu"))
    if "WORLD_SIZE" not in os.environ:
        return Runtime(None, 0, torch.device("cuda" if cuda else "cpu"), dtype)
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if cuda else "gloo")
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.parallel.timeout_s),
                            device_id=device if backend == "nccl" else None)
    return Runtime(dims.build(), dist.get_rank(), device, dtype)


def _check_wired(cfg: Config, dims: ParallelDims) -> None:
    p = cfg.parallel
    if dims.pp > 1 and dims.dp > 1 and p.data_parallel == "ddp":
        raise ConfigError(f"parallel.data_parallel = 'ddp' with parallel.pp = {dims.pp}: DDP decides at forward time "
                          "whether a backward reduces, and 1F1B interleaves them; use parallel.data_parallel=fsdp")
    if p.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel: not wired into the trainer yet (packs would need padding "
                          "to a multiple of tp); set it to false")


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """train.dtype on `device`: bf16 (forwards under autocast, fp32 master weights) for bfloat16, and for auto
    on CUDA; None (plain fp32) for float32, and for auto on CPU, where bf16 matmuls are no faster."""
    d = cfg.train.dtype
    return torch.bfloat16 if d == "bfloat16" or (d == "auto" and device.type == "cuda") else None


# -- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RFTData:
    seqs: list[Sequence]  # one per expert trajectory, in file order
    vocab_size: int  # the tokenizer's, special tokens included


def load_rft_data(data_dir: str | Path, cfg: Config) -> RFTData:
    """Expert trajectories of a `sailor-engine synth` output, rendered with the chat template (tool
    responses masked out of the loss). Errors name train.data_dir or the trajectory's line."""
    d = Path(data_dir)
    missing = [f for f in ("experts.jsonl", "tokenizer.json") if not (d / f).is_file()]
    if missing:
        raise ConfigError(f"train.data_dir = {str(d)!r}: no {' or '.join(missing)} there "
                          "(expected a `sailor-engine synth --out DIR` output)")
    tok = Tokenizer.from_file(d / "tokenizer.json")
    tpl = ChatTemplate(tok)
    seqs = []
    budget = cfg.train.micro_batch_tokens
    for line, t in enumerate(read_jsonl(d / "experts.jsonl", Trajectory), 1):
        ids, mask = tpl.render_messages([msgspec.to_builtins(m) for m in t.messages])
        if len(ids) - 1 > budget:
            raise ConfigError(f"{d / 'experts.jsonl'}:{line}: a trajectory of {len(ids)} tokens does not fit "
                              f"train.micro_batch_tokens ({budget})")
        seqs.append(Sequence(ids, mask))
    if not seqs:
        raise ConfigError(f"train.data_dir = {str(d)!r}: experts.jsonl holds no trajectories")
    return RFTData(seqs, tok.vocab_size)


# -- model -------------------------------------------------------------------------------------


def padded_vocab(tokenizer_size: int, tp: int) -> int:
    """Tokenizer size rounded up to a multiple of 64 * tp (tensor-core friendly, and splits tp ways)."""
    m = 64 * tp
    return math.ceil(tokenizer_size / m) * m


def build_model(cfg: Config, tokenizer_size: int, rt: Runtime) -> Transformer:
    """The model of this rank: tp-sharded when tp > 1, on rt.device, fp32.

    train.init_from None: random init from the model section (vocab: padded_vocab), from the same
    seed on every rank. Else an HF directory (load_hf / load_hf_tp) or an engine checkpoint (a
    directory with manifest.json, any tp layout).
    """
    src = cfg.train.init_from
    groups = rt.groups
    if src is None:
        mcfg = msgspec.structs.replace(cfg.model, vocab_size=padded_vocab(tokenizer_size, rt.tp))
        _check_tp(mcfg, rt.tp, "model")
        model = Transformer(mcfg).init_weights(generator=torch.Generator().manual_seed(cfg.train.seed))
        if rt.tp > 1:
            parallelize_tp(model, groups)
    elif not Path(src).is_dir():
        raise ConfigError(f"train.init_from = {src!r}: not a directory (an HF model or an engine checkpoint)")
    elif (Path(src) / MANIFEST).is_file():
        mcfg = checkpoint_config(src)
        _check_tp(mcfg, rt.tp, f"train.init_from = {src!r}: its model")
        with torch.device("meta"):
            model = Transformer(mcfg)
        if rt.tp > 1:
            parallelize_tp(model, groups)
        load_checkpoint(model, src, assign=True)
    else:
        model = load_hf_tp(src, groups, dtype=torch.float32) if rt.tp > 1 else load_hf(src, dtype=torch.float32)
    if model.cfg.vocab_size < tokenizer_size:
        raise ConfigError(f"train.init_from = {src!r}: vocab_size {model.cfg.vocab_size} is smaller than the "
                          f"tokenizer of train.data_dir ({tokenizer_size} tokens)")
    model.to(rt.device)
    model.reset_buffers(rt.device)
    return model


def _check_tp(mcfg, tp: int, what: str) -> None:
    try:
        check_tp_layout(mcfg, tp)
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None


def wrap_model(model: Transformer, cfg: Config, rt: Runtime) -> nn.Module:
    """The module the loop calls, forward(x, cu_seqlens (S+1,), positions (N,)) -> hidden (N, H): this
    rank's pipeline stage (the whole model when pp = 1, stage_layers' share otherwise); when dp > 1
    under FSDP2 (layers and root sharded in place, so build the optimizer after this) or DDP,
    gradients summed over dp. `unwrap(stage)` is the PipelineStage."""
    stage = PipelineStage(model, stage_layers(model.cfg, rt.pp)[rt.pp_rank], rt.pp_rank, rt.pp)
    if rt.dp > 1:
        # several forwards precede their backwards under 1F1B: keep the gathered layers until then
        stage = data_parallel(stage, rt.groups.dp, mode=cfg.parallel.data_parallel, reshard_after_forward=rt.pp == 1)
    return stage


def build_optimizer(params, cfg: Config) -> torch.optim.AdamW:
    """AdamW over `params` (the stage's), one parameter group (checkpoints rely on it)."""
    t = cfg.train
    return torch.optim.AdamW(params, lr=t.rft.lr, betas=t.betas, eps=t.adam_eps, weight_decay=t.rft.weight_decay)
