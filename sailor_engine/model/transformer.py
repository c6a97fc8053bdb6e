"""One decoder for the Llama, Qwen2 and Qwen3 families.

RMSNorm, RoPE (with Llama-3 frequency scaling), grouped-query attention, SwiGLU, optional q/k/v bias
(Qwen2), per-head q/k RMSNorm (Qwen3), tied or untied embeddings. Parameter names follow the
Hugging Face layout (minus the "model." prefix), so checkpoints map one to one (see hf.py).

Three forward modes, sharing every layer:

    logits = model(input_ids)                                  # (B, T) -> (B, T, V), padded batch
    hidden = model.forward_packed(input_ids, cu_seqlens)       # (N,) -> (N, H), packed varlen
    hidden = model.forward_cached(input_ids, cu_seqlens, cache, slots)   # append to a KV cache

The packed and cached modes stop at the final norm and return hidden states: the training loss feeds
them with `model.output_weight` to the fused log-prob kernel, so no (N, V) logits tensor is ever
built; `model.logits(hidden)` exists for generation and tests.

Numerics follow transformers (RMSNorm in fp32 then cast back, RoPE tables in fp32 cast to the
activation dtype), which is what makes fp32 logits agree to ~1e-6.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import CachedAttention, KVCache, PaddedAttention, VarlenAttention, resolve_backend
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, **factory):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **factory))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x: (..., D), weight: (D,). A function so that tensor parallelism can pass a wrapped weight."""
    if x.dtype == torch.float32:  # one fused op, same arithmetic as below
        return F.rms_norm(x, weight.shape, weight, eps)
    # HF's order for low precision: normalise in fp32, round to the input dtype, then scale.
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """Inverse frequencies (head_dim // 2,) in fp32, with Llama-3 scaling when configured.

    Llama-3 scaling keeps short wavelengths, divides long ones (beyond the pre-training context /
    low_freq_factor) by `factor`, and interpolates smoothly in between.
    """
    d = cfg.dim_per_head
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    long_wave = s.original_max_position_embeddings / s.low_freq_factor
    short_wave = s.original_max_position_embeddings / s.high_freq_factor
    scaled = torch.where(wavelen > long_wave, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= short_wave) & (wavelen <= long_wave)
    return torch.where(medium, blended, scaled)


def rope_tables(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin: positions.shape + (head_dim,), computed in fp32 and cast to the activation dtype."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (..., heads, head_dim); cos, sin: (..., head_dim). Rotate-half convention."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, **factory):
        super().__init__()
        d = cfg.dim_per_head
        # head counts on this rank: the config's, until tensor parallelism shards them
        self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim = layer_idx, cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=cfg.qkv_bias, **factory)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.qkv_bias, **factory)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.qkv_bias, **factory)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=cfg.o_bias, **factory)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, **factory)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, **factory)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn) -> Tensor:
        """x: (..., hidden) -> (..., hidden); `attn` is one of the contexts in attention.py."""
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, -1, self.head_dim)  # (..., heads, d)
        k = self.k_proj(x).view(*lead, -1, self.head_dim)  # (..., kv_heads, d)
        v = self.v_proj(x).view(*lead, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attn(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(*lead, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, **factory):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, **factory)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, **factory)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, **factory):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **factory)
        self.self_attn = Attention(cfg, layer_idx, **factory)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **factory)
        self.mlp = MLP(cfg, **factory)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The decoder. `Transformer(cfg, device=..., dtype=...)`; weights are initialised by `init_weights`."""

    def __init__(self, cfg: ModelConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **factory)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, **factory) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **factory)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, **factory)
        # Not a checkpoint tensor: derived from the config, so it is rebuilt rather than loaded.
        self.register_buffer("inv_freq", rope_inv_freq(cfg, device=device if device != "meta" else None), persistent=False)
        self._backend_cache: dict[tuple, str] = {}
        # Tensor-parallel hooks, set by model/parallelize.py: the kv heads this rank holds (its KV
        # cache width) and `tp`, an object with .group (the tp process group) and
        # .logits(hidden, output_weight) -> full-vocabulary logits from this rank's vocab shard.
        self.num_kv_heads = cfg.num_kv_heads
        self.tp = None

    # -- weights -------------------------------------------------------------------------------
    @property
    def tp_group(self):
        """The group output_weight is vocab-sharded over (fused_linear_logprob's tp_group), or None."""
        return None if self.tp is None else self.tp.group

    @property
    def output_weight(self) -> Tensor:
        """(V, H): the LM head matrix (the embedding when tied), for the fused log-prob kernel."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> "Transformer":
        """Normal(0, std) for matrices and embeddings, zeros for biases, ones for norms (HF's scheme)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * std)
        return self

    def reset_buffers(self, device: torch.device | str) -> None:
        """Recompute derived buffers, e.g. after materialising a model built on the meta device."""
        self.inv_freq = rope_inv_freq(self.cfg, device=device)

    # -- forward modes -------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, *, position_ids: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
        """Padded batch. input_ids: (B, T); attention_mask: (B, T), 1 = token, 0 = padding.

        Returns logits (B, T, V). position_ids default to 0..T-1 (for left padding pass the
        positions, e.g. attention_mask.cumsum(-1) - 1 clamped at 0).
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        hidden = self._run(input_ids, position_ids, PaddedAttention(attention_mask))
        return self.logits(hidden)

    def forward_packed(self, input_ids: Tensor, cu_seqlens: Tensor, *, position_ids: Tensor | None = None,
                       max_seqlen: int | None = None) -> Tensor:
        """Packed varlen. input_ids: (N,) all sequences back to back; cu_seqlens: (S + 1,).

        Attention never crosses a sequence boundary. position_ids: (N,), default restart at 0 in
        each sequence. Returns the final-norm hidden states (N, H).
        """
        _check_cu_seqlens(cu_seqlens, input_ids.shape[0])
        if position_ids is None:
            position_ids = packed_positions(cu_seqlens, input_ids.shape[0])
        backend = self._backend(input_ids.device)
        return self._run(input_ids, position_ids, VarlenAttention(cu_seqlens, backend, max_seqlen))

    def forward_cached(self, input_ids: Tensor, cu_seqlens: Tensor, cache: KVCache, slots: Tensor) -> Tensor:
        """Append packed new tokens (N,) of S sequences to cache rows `slots` (S,) and run them.

        Covers prefill (empty slot), resume after a tool response (only the appended tokens) and
        decode (one token per sequence). Returns hidden (N, H); advances cache.lengths[slots].
        """
        _check_cu_seqlens(cu_seqlens, input_ids.shape[0])
        attn = CachedAttention(cache, cu_seqlens, slots)
        hidden = self._run(input_ids, attn.positions, attn)
        attn.commit()
        return hidden

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., H) -> (..., V) full-vocabulary logits. Training never calls this (fused kernel)."""
        if self.tp is not None:
            return self.tp.logits(hidden, self.output_weight)
        return F.linear(hidden, self.output_weight)

    def new_kv_cache(self, num_slots: int, max_seq_len: int, *, dtype: torch.dtype | None = None) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.cfg.num_layers, num_slots, max_seq_len, self.num_kv_heads, self.cfg.dim_per_head,
                       dtype=dtype or p.dtype, device=p.device)

    def _run(self, input_ids: Tensor, positions: Tensor, attn) -> Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = rope_tables(self.inv_freq, positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attn)
        return self.norm(x)

    def _backend(self, device: torch.device) -> str:
        key = (device.type, self.embed_tokens.weight.dtype)
        if key not in self._backend_cache:
            self._backend_cache[key] = resolve_backend(self.cfg.attn_backend, device, key[1])
        return self._backend_cache[key]


def packed_positions(cu_seqlens: Tensor, n: int) -> Tensor:
    """(N,) positions restarting at 0 at every sequence start."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = torch.repeat_interleave(cu_seqlens[:-1], lens, output_size=n)
    return torch.arange(n, device=cu_seqlens.device) - starts


def _check_cu_seqlens(cu: Tensor, n: int) -> None:
    if cu.ndim != 1 or cu.numel() < 1 or cu.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor (S + 1,), got shape {tuple(cu.shape)} {cu.dtype}")
    if int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at N={n}; got {cu.tolist()[:8]}...")
