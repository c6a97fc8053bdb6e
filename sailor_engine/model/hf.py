"""Hugging Face checkpoints: config.json + safetensors in, config.json + safetensors out.

    model = load_hf("path/to/Qwen2.5-0.5B", dtype=torch.bfloat16, device="cuda")
    save_hf(model, "out/hf")          # transformers.AutoModelForCausalLM.from_pretrained("out/hf") loads it

Reads a single model.safetensors or a sharded model.safetensors.index.json; never a pickle
(pytorch_model.bin is refused with a message). The model is built on the meta device and the
tensors are assigned straight from the files, so loading needs no second copy in memory.
Config keys of transformers 4.x (rope_theta / rope_scaling) and 5.x (rope_parameters) are both read;
both are written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig, RopeScaling
from .transformer import Transformer

_FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def config_from_hf(d: dict, *, source: str = "config.json") -> ModelConfig:
    """Map a transformers config dict to ModelConfig; unsupported features are errors, not guesses."""
    family = d.get("model_type")
    if family not in _FAMILIES:
        raise ValueError(f"{source}: model_type {family!r} is not supported (supported: {', '.join(_FAMILIES)})")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (SwiGLU needs 'silu')")
    if d.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported")
    rope = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = None
    if rope_type == "llama3":
        src = rope if "factor" in rope else legacy
        scaling = RopeScaling(factor=float(src["factor"]), low_freq_factor=float(src["low_freq_factor"]),
                              high_freq_factor=float(src["high_freq_factor"]),
                              original_max_position_embeddings=int(src["original_max_position_embeddings"]))
    elif rope_type != "default":
        raise ValueError(f"{source}: rope_type {rope_type!r} is not supported (default, llama3)")
    attn_bias = bool(d.get("attention_bias", False))
    heads = d["num_attention_heads"]
    return ModelConfig(
        family=family,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or None,
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        qkv_bias=True if family == "qwen2" else attn_bias,  # Qwen2 always has q/k/v bias
        o_bias=False if family == "qwen2" else attn_bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
    )


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    if cfg.family == "qwen2" and (not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias or cfg.qk_norm):
        raise ValueError("a qwen2 checkpoint has q/k/v bias and nothing else: set qkv_bias only, or use family llama")
    if cfg.family in ("llama", "qwen3") and cfg.qkv_bias != cfg.o_bias:
        raise ValueError(f"{cfg.family} checkpoints have one attention_bias for q/k/v and o: qkv_bias must equal o_bias")
    if cfg.family == "qwen3" and (not cfg.qk_norm or cfg.mlp_bias):
        raise ValueError("a qwen3 checkpoint has q/k norms and no MLP bias")
    if cfg.family != "qwen3" and cfg.qk_norm:
        raise ValueError("qk_norm is a qwen3 feature: set family qwen3")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    legacy_scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        extra = {"factor": s.factor, "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                 "original_max_position_embeddings": s.original_max_position_embeddings}
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **extra}
        legacy_scaling = {"rope_type": "llama3", **extra}
    d = {
        "architectures": [_FAMILIES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,  # transformers 4.x reads these two
        "rope_scaling": legacy_scaling,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.family != "qwen2":
        d["attention_bias"] = cfg.qkv_bias
    if cfg.family == "llama":
        d["mlp_bias"] = cfg.mlp_bias
    return d


def hf_key(name: str) -> str:
    """Engine parameter name -> HF checkpoint key."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def _weight_files(path: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    if single.exists():
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(f"{path}: only safetensors checkpoints are loaded (pickled .bin/.pt files are refused)")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_hf(path: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
            **overrides) -> Transformer:
    """Build the engine's model from an HF directory. dtype None keeps the checkpoint's dtype.

    `overrides` replace ModelConfig fields (e.g. attn_backend="flex").
    """
    with torch.device("meta"):
        model = Transformer(read_hf_config(path, **overrides))
    return load_hf_weights(model, path, dtype=dtype, device=device)


def read_hf_config(path: str | Path, **overrides) -> ModelConfig:
    """ModelConfig of an HF directory's config.json, with ModelConfig fields replaced by `overrides`."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: not found")
    cfg = config_from_hf(json.loads(cfg_path.read_text()), source=str(cfg_path))
    if overrides:
        import msgspec

        cfg = msgspec.structs.replace(cfg, **overrides)
    return cfg


def load_hf_weights(model: Transformer, path: str | Path, *, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", readers: dict | None = None) -> Transformer:
    """Assign every parameter of `model` (typically built on the meta device) from the checkpoint.

    readers: parameter name -> fn(safetensors slice) -> tensor, for parameters that take only part
    of a checkpoint tensor (tensor-parallel shards read just their rows or columns); others are
    read whole. Each tensor read must have the parameter's shape.
    """
    path = Path(path)
    files = _weight_files(path)
    readers = readers or {}
    state = {}
    handles = {}
    try:
        for name, param in model.named_parameters():
            key = hf_key(name)
            if key not in files:
                raise KeyError(f"{path}: checkpoint has no tensor {key!r} (needed by {name})")
            if files[key] not in handles:
                handles[files[key]] = safe_open(files[key], framework="pt")
            f = handles[files[key]]
            t = readers[name](f.get_slice(key)) if name in readers else f.get_tensor(key)
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, the config implies {tuple(param.shape)}")
            state[name] = t.to(device=device, dtype=dtype or t.dtype)
    finally:
        handles.clear()
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_buffers(device)
    return model


def save_hf(model: Transformer, path: str | Path, *, dtype: torch.dtype | None = None,
            max_shard_bytes: int = 4 * 2**30) -> None:
    """Write config.json and safetensors (sharded with an index above max_shard_bytes)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {hf_key(n): p.detach().to(dtype or p.dtype).contiguous().cpu() for n, p in model.named_parameters()}
    out_dtype = dtype or model.embed_tokens.weight.dtype
    (path / "config.json").write_text(json.dumps(config_to_hf(model.cfg, out_dtype), indent=2) + "\n")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    meta = {"format": "pt"}
    if total <= max_shard_bytes:
        save_file(tensors, path / "model.safetensors", metadata=meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, path / name, metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def num_params(model: Transformer) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())
