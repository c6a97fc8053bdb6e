"""Tensor parallelism for the decoder: shard a Transformer over the tp axis, or load HF weights as shards.

    model = parallelize_tp(Transformer(cfg).init_weights(...), groups)   # shard a full model in place
    model = parallelize_tp(model, groups, sequence_parallel=True)        # + Megatron sequence parallelism
    model = load_hf_tp("path/to/Qwen2.5-7B", groups, dtype=torch.bfloat16, device="cuda")  # read slices only
    hidden = model.forward_packed(ids, cu)                                 # (N, H), replicated over tp
    logp = fused_linear_logprob(hidden, model.output_weight, targets, tp_group=model.tp_group)

Megatron's layout (transformer.py stays the single-process model; this file is the bridge to
parallel/):
- q/k/v and gate/up are column-parallel: rank r holds heads [r * n / tp, (r + 1) * n / tp) and the
  matching MLP columns; o_proj and down_proj are row-parallel and all-reduce their outputs. Each
  block's input norm enters the tp region once (one backward all-reduce for q, k and v together).
- GQA with fewer kv heads than ranks: kv head j is replicated on the tp / kv ranks whose query heads
  use it (rank r keeps kv head r // (tp / kv)); their weight grads are summed over the replicas.
- Qwen2 q/k/v biases shard with their rows; Qwen3 q/k norms are replicated and, since each rank
  normalises only its own heads, their weight grads are all-reduced.
- The embedding is vocab-parallel; the LM head is its own vocab shard, or the embedding's shard
  when tied (one parameter serves both). `model.logits` gathers the full vocab (sampling, tests);
  training feeds `model.output_weight` with `tp_group=model.tp_group` to the fused log-prob kernel,
  so no rank ever holds (N, V) logits.
- Norm gains, row-parallel biases and the final norm are replicated and receive whole grads.
- Optional sequence parallelism (set_sequence_parallel): norms and residuals on token shards.

Parameter names are unchanged (HF layout), so each rank's state dict is its shard of the HF one;
`shard_plan(model)` says which block of which full tensor each parameter is.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from sailor_engine.model.hf import load_hf_weights, read_hf_config
from sailor_engine.model.transformer import Transformer
from sailor_engine.parallel.dims import ParallelGroups
from sailor_engine.parallel.layers import (ColumnParallelLinear, RowParallelLinear, Shard, SharedGroup, TPRMSNorm,
                                           VocabParallelEmbedding, vocab_parallel_logits)


def check_tp_layout(cfg, tp: int) -> None:
    """Raise naming the sizes when the model cannot be split tp ways."""
    if cfg.num_heads % tp:
        raise ValueError(f"model.num_heads ({cfg.num_heads}) is not divisible by the tensor-parallel size ({tp})")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise ValueError(f"model.num_kv_heads ({cfg.num_kv_heads}) and the tensor-parallel size ({tp}): one must "
                         "divide the other (kv heads are split, or replicated when fewer)")
    for field in ("intermediate_size", "vocab_size"):
        if getattr(cfg, field) % tp:
            raise ValueError(f"model.{field} ({getattr(cfg, field)}) is not divisible by the tensor-parallel size ({tp})")


def parallelize_tp(model: Transformer, groups: ParallelGroups | dist.ProcessGroup, *,
                   sequence_parallel: bool = False) -> Transformer:
    """Shard `model` over the tp group in place and return it.

    Every rank passes the same full model (same weights); afterwards each holds only its shards.
    A model on the meta device stays on it (load_hf_tp then assigns the shards). tp = 1 is a no-op.
    sequence_parallel: see set_sequence_parallel.
    """
    group = groups.tp if isinstance(groups, ParallelGroups) else groups
    tp = dist.get_world_size(group)
    if tp == 1:
        return set_sequence_parallel(model, sequence_parallel)  # refuses sequence_parallel=True
    if model.tp_group is not None:
        raise ValueError("parallelize_tp: the model is already tensor-parallel")
    cfg = model.cfg
    check_tp_layout(cfg, tp)
    d, H = cfg.dim_per_head, cfg.hidden_size
    kv_replicas = max(1, tp // cfg.num_kv_heads)
    like = {"device": model.embed_tokens.weight.device, "dtype": model.embed_tokens.weight.dtype}

    def norm(old, **kw):
        return TPRMSNorm(old.weight.shape[0], old.eps, group=group, **kw, **like)

    def column(out, bias, **kw):
        return ColumnParallelLinear(H, out, group=group, bias=bias, input_in_tp_region=True, **kw, **like)

    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _swap(layer, "input_layernorm", norm(layer.input_layernorm, role="enter"))
        _swap(layer, "post_attention_layernorm", norm(layer.post_attention_layernorm, role="enter"))
        _swap(attn, "q_proj", column(cfg.num_heads * d, cfg.qkv_bias))
        _swap(attn, "k_proj", column(cfg.num_kv_heads * d, cfg.qkv_bias, replicas=kv_replicas))
        _swap(attn, "v_proj", column(cfg.num_kv_heads * d, cfg.qkv_bias, replicas=kv_replicas))
        _swap(attn, "o_proj", RowParallelLinear(cfg.num_heads * d, H, group=group, bias=cfg.o_bias, **like))
        if attn.q_norm is not None:
            _swap(attn, "q_norm", norm(attn.q_norm, role="heads"))
            _swap(attn, "k_norm", norm(attn.k_norm, role="heads"))
        attn.num_heads, attn.num_kv_heads = cfg.num_heads // tp, max(1, cfg.num_kv_heads // tp)
        _swap(mlp, "gate_proj", column(cfg.intermediate_size, cfg.mlp_bias))
        _swap(mlp, "up_proj", column(cfg.intermediate_size, cfg.mlp_bias))
        _swap(mlp, "down_proj", RowParallelLinear(cfg.intermediate_size, H, group=group, bias=cfg.mlp_bias, **like))
    _swap(model, "embed_tokens", VocabParallelEmbedding(cfg.vocab_size, H, group=group, **like))
    _swap(model, "norm", norm(model.norm, role="final"))
    if model.lm_head is not None:  # untied: its own vocab shard (a column-parallel weight, no bias)
        _swap(model, "lm_head", ColumnParallelLinear(H, cfg.vocab_size, group=group, bias=False, **like))
    model.num_kv_heads = max(1, cfg.num_kv_heads // tp)
    model.tp = TensorParallel(group)
    return set_sequence_parallel(model, sequence_parallel)


def set_sequence_parallel(model: Transformer, enabled: bool) -> Transformer:
    """Switch Megatron sequence parallelism on a tp model on or off (same parameters, same math).

    On: between tp regions (norms, residual adds) each rank holds a token shard, dim 0 of the
    activations split tp ways: the embedding and the row-parallel outputs reduce-scatter instead of
    all-reducing, the block norms all-gather into the tp region, and the final norm gathers, so
    forward_packed still returns (N, H) replicated. Activation memory outside attention and MLP
    drops tp-fold for the same communication volume. Every forward's dim 0 (the tokens of a pack,
    the batch of a padded forward) must then be a multiple of tp: pad packs accordingly. The
    generator's batches are arbitrary, so switch it off around generation.
    """
    if model.tp_group is None:
        if enabled:
            raise ValueError("sequence parallelism needs a tensor-parallel model (parallelize_tp with tp > 1)")
        return model
    for m in model.modules():
        if isinstance(m, (TPRMSNorm, RowParallelLinear, VocabParallelEmbedding)):
            m.sequence_parallel = enabled
    return model


class TensorParallel(SharedGroup):
    """`model.tp` of a tensor-parallel Transformer: its group, and full logits from the vocab shard.

    Shared, not copied, by copy.deepcopy (see SharedGroup)."""

    __slots__ = ()

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_logits(hidden, weight, self.group)


def shard_plan(model: nn.Module) -> dict[str, Shard]:
    """Parameter name -> its block of the full (HF) tensor; parameters not listed are replicated."""
    plan = {}
    for prefix, module in model.named_modules():
        for pname, shard in getattr(module, "shards", {}).items():
            plan[f"{prefix}.{pname}" if prefix else pname] = shard
    return plan


def load_hf_tp(path: str | Path, groups: ParallelGroups | dist.ProcessGroup, *, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu", **overrides) -> Transformer:
    """Build the tp-sharded model from an HF directory; each rank reads only its slices of the files."""
    with torch.device("meta"):
        model = Transformer(read_hf_config(path, **overrides))
    model = parallelize_tp(model, groups)
    readers = {name: shard.read for name, shard in shard_plan(model).items()}
    return load_hf_weights(model, path, dtype=dtype, device=device, readers=readers)


@torch.no_grad()
def _swap(parent: nn.Module, attr: str, new: nn.Module) -> None:
    """Replace parent.attr by `new`, filling new's parameters from the old module's full tensors."""
    old = getattr(parent, attr)
    shards = getattr(new, "shards", {})
    for name, p in new.named_parameters(recurse=False):
        src = getattr(old, name, None)
        if src is None:
            raise ValueError(f"{attr}.{name}: the tp layer has this parameter, the model does not")
        src = shards[name].take(src) if name in shards else src
        if src.shape != p.shape:
            raise ValueError(f"{attr}.{name}: the tp layer expects {tuple(p.shape)}, the model gives {tuple(src.shape)}")
        p.copy_(src)
    setattr(parent, attr, new)
