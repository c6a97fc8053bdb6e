"""One decoder for the Llama, Qwen2 and Qwen3 families.

RMSNorm, RoPE (with Llama-3 frequency scaling), grouped-query attention, SwiGLU, optional q/k/v bias
(Qwen2), per-head q/k RMSNorm (Qwen3), tied or untied embeddings. Parameter names follow the
Hugging Face layout (minus the "model." prefix), so checkpoints map one to one (see hf.py).

Three forward modes (and a static-shape decode step), sharing every layer:

    logits = model(input_ids)                                  # (B, T) -> (B, T, V), padded batch
    hidden = model.forward_packed(input_ids, cu_seqlens)       # (N,) -> (N, H), packed varlen
    hidden = model.forward_cached(input_ids, cu_seqlens, cache, slots)   # append to a KV cache
    hidden = model.forward_decode(input_ids, cache, slots)     # one token per row, CUDA-graph capturable

forward_cached also takes `weights=FusedWeights(model)`: fused, transposed copies of the matrices
for small-batch CPU generation (same arithmetic, fewer and faster matmuls; see FusedWeights).

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

from sailor_engine.kernels import cpu_decoder

from .attention import (ROW_ALIGN, CachedAttention, PaddedAttention, StaticDecodeAttention, VarlenAttention,
                        compute_dtype, model_backend, pad_rows)
from .kv_cache import KVCache
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

    def forward_cached(self, input_ids: Tensor, cu_seqlens: Tensor, cache: KVCache, slots: Tensor, *,
                       weights: "FusedWeights | None" = None) -> Tensor:
        """Append packed new tokens (N,) of S sequences to cache rows `slots` (S,) and run them.

        Covers prefill (empty slot), resume after a tool response (only the appended tokens) and
        decode (one token per sequence). Returns hidden (N, H); advances cache.lengths[slots].
        `weights`: fused copies of this model's matrices (FusedWeights, built by the generator) for
        fewer, faster matmuls; the result agrees with the module path to rounding in the working dtype.
        """
        _check_cu_seqlens(cu_seqlens, input_ids.shape[0])
        attn = CachedAttention(cache, cu_seqlens, slots)
        if weights is None:
            hidden = self._run(input_ids, attn.positions, attn)
        else:
            hidden = weights.run(input_ids, attn.positions, attn)
        attn.commit()
        return hidden

    def forward_decode(self, input_ids: Tensor, cache: KVCache, slots: Tensor, *, attn_impl: str = "auto") -> Tensor:
        """One new token per cache row: input_ids (B,), slots (B,) int64 on the model's device -> hidden (B, H).

        forward_cached's decode step with static shapes and no host synchronisation (positions come
        from cache.lengths on the device; attention is kernels.decode_attention), so a CUDA graph can
        capture it (rollout/decode_graph.py). Agrees with forward_cached to rounding. Nothing is
        validated: the caller keeps slots in range and every row's length below the cache's capacity.
        """
        attn = StaticDecodeAttention(cache, slots, impl=attn_impl)
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
        """The attention backend for the dtype attention computes in (attention.compute_dtype)."""
        key = (device.type, compute_dtype(device.type, self.embed_tokens.weight.dtype))
        if key not in self._backend_cache:
            self._backend_cache[key] = model_backend(self.cfg, device, key[1])
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


NATIVE_CPU_DECODER = True  # FusedWeights.run in one C call where it can (tests and benchmarks switch it off)


class FusedWeights:
    """Generation-time copies of a Transformer's matrices, laid out for small-batch CPU inference.

        w = FusedWeights(model)            # copies; model parameters are untouched
        w.refresh()                        # before each use: re-copies what changed since
        hidden = model.forward_cached(ids, cu, cache, slots, weights=w)
        logits = w.logits(hidden)

    Why: a decode step multiplies (batch, hidden) activations by ~30 small matrices, and at these
    sizes per-op overhead and GEMM shape dominate. q/k/v are concatenated into one matrix and gate/up
    into another (3 + 2 matmuls become 2), and every matrix is stored transposed, (in, out)
    contiguous: MKL runs `x @ W_t` up to ~1.7x faster than F.linear's `x @ W.T` for skinny x (the LM
    head is the largest). Layers also skip nn.Module dispatch and rotate q and k in one RoPE call.
    The arithmetic is the module path's up to rounding: GEMM blocking differs, and the residual add
    happens inside the o / down GEMMs (bit-identical in fp32 in our tests; in bf16 one rounding fewer).

    On CPU with the C kernels built (NATIVE_CPU_DECODER; sailor_engine.kernels.cpu_decoder), `run` is one
    C call for all layers over the same copies: the matmuls are the same BLAS calls, bit for bit, and
    the rest is fused; the norms' sums and SiLU's exp round unlike torch's (~1e-6 relative), and every
    sum runs in a fixed order, so the batch and chunking invariance above hold as well.

    Staleness: the copies are keyed on each source parameter's (data_ptr, _version). Every in-place
    update through the parameter (optimizer steps, load_state_dict, copy_) bumps _version, so
    `refresh()` re-copies exactly the layers that changed. Writes through `p.data` bypass the counter,
    and a parameter *replaced* by a new object is not seen: build a new FusedWeights after those (the
    Generator builds one per rollout). Norm weights and the embedding rows are read live, never copied.
    """

    def __init__(self, model: Transformer):
        if not fusable(model):
            raise ValueError("FusedWeights needs a plain single-device Transformer (no tensor parallelism, "
                             "no DTensor parameters)")
        self.model = model
        cfg = model.cfg
        self.eps, self.head_dim = cfg.rms_norm_eps, cfg.dim_per_head
        self.layers: list[dict[str, Tensor | None]] = [{} for _ in model.layers]
        # the parameters each copy is made from: per layer its 7 linears, then the LM head
        self._sources = [[p for lin in _linears(layer) for p in (lin.weight, lin.bias) if p is not None]
                         for layer in model.layers] + [[model.output_weight]]
        self._keys: list[list | None] = [None] * len(self._sources)
        self.output_t: Tensor | None = None
        self.native: cpu_decoder.DecoderWeights | None = None
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-copy the matrices of every layer (and the LM head) whose parameters changed (~10 us)."""
        m = self.model
        keys = [[(p.data_ptr(), p._version) for p in ps] for ps in self._sources]
        if keys == self._keys:
            return
        for i, layer in enumerate(m.layers):
            a, mlp = layer.self_attn, layer.mlp
            if keys[i] == self._keys[i]:
                continue
            self.layers[i] = {
                "qkv_t": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).t().contiguous(),
                "qkv_b": None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
                "o_t": a.o_proj.weight.t().contiguous(),
                "o_b": None if a.o_proj.bias is None else a.o_proj.bias.clone(),
                "gu_t": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t().contiguous(),
                "gu_b": None if mlp.gate_proj.bias is None else torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]),
                "down_t": mlp.down_proj.weight.t().contiguous(),
                "down_b": None if mlp.down_proj.bias is None else mlp.down_proj.bias.clone(),
            }
        if keys[-1] != self._keys[-1]:
            self.output_t = m.output_weight.t().contiguous()  # (H, V)
        self._keys = keys
        self.native = self._native_weights()

    def _native_weights(self) -> "cpu_decoder.DecoderWeights | None":
        m = self.model
        if not (m.embed_tokens.weight.device.type == "cpu" and m.embed_tokens.weight.dtype == torch.float32
                and cpu_decoder.available()):
            return None
        layers = []
        for layer, w in zip(m.layers, self.layers):
            a = layer.self_attn
            layers.append(cpu_decoder.LayerWeights(
                layer.input_layernorm.weight, w["qkv_t"], w["qkv_b"], None if a.q_norm is None else a.q_norm.weight,
                None if a.k_norm is None else a.k_norm.weight, w["o_t"], w["o_b"], layer.post_attention_layernorm.weight,
                w["gu_t"], w["gu_b"], w["down_t"], w["down_b"]))
        a = m.layers[0].self_attn
        return cpu_decoder.DecoderWeights(layers, m.norm.weight, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads,
                                          eps=self.eps)

    def logits(self, hidden: Tensor) -> Tensor:
        """(N, H) -> (N, V), as Transformer.logits."""
        return _rows_aligned(lambda h: h @ self.output_t, hidden)

    def run(self, input_ids: Tensor, positions: Tensor, attn) -> Tensor:
        """Transformer._run on the fused copies: (N,) token ids -> final-norm hidden (N, H)."""
        m, d, eps = self.model, self.head_dim, self.eps
        x = F.embedding(input_ids, m.embed_tokens.weight)
        cos, sin = rope_tables(m.inv_freq, positions, x.dtype)
        # self.native exists only for fp32 CPU weights, so x is fp32 too; under autocast the torch path
        if (NATIVE_CPU_DECODER and self.native is not None and isinstance(attn, CachedAttention) and attn.native
                and not torch.is_autocast_enabled("cpu")):
            c = attn.cache
            return cpu_decoder.forward(self.native, x, cos, sin, c.k, c.v, attn.tok_slot, attn.positions)
        N = x.shape[0]
        for layer, w in zip(m.layers, self.layers):
            a = layer.self_attn
            Hq, Hkv = a.num_heads, a.num_kv_heads
            qkv = _matmul(rms_norm(x, layer.input_layernorm.weight, eps), w["qkv_t"], w["qkv_b"]).view(N, -1, d)
            if a.q_norm is None:  # q and k rotated in one call: same elementwise arithmetic
                qk = apply_rope(qkv[:, : Hq + Hkv], cos, sin)
                q, k = qk[:, :Hq], qk[:, Hq:]
            else:
                q = apply_rope(rms_norm(qkv[:, :Hq], a.q_norm.weight, eps), cos, sin)
                k = apply_rope(rms_norm(qkv[:, Hq : Hq + Hkv], a.k_norm.weight, eps), cos, sin)
            out = attn(a.layer_idx, q, k, qkv[:, Hq + Hkv :])
            x = _residual_matmul(x, out.reshape(N, -1), w["o_t"], w["o_b"])
            gu = _matmul(rms_norm(x, layer.post_attention_layernorm.weight, eps), w["gu_t"], w["gu_b"])
            x = _residual_matmul(x, _swiglu_(gu), w["down_t"], w["down_b"])
        return rms_norm(x, m.norm.weight, eps)


def fusable(model) -> bool:
    """Whether FusedWeights can stand in for `model`'s matrices: a plain Transformer, no tensor
    parallelism (its matrices are shards), no DTensor (FSDP) parameters."""
    if not isinstance(model, Transformer) or model.tp is not None:
        return False
    return all(type(p.data) is torch.Tensor for p in model.parameters())


def _linears(layer: DecoderLayer) -> tuple[nn.Linear, ...]:
    a, mlp = layer.self_attn, layer.mlp
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj


def _matmul(x: Tensor, w_t: Tensor, b: Tensor | None) -> Tensor:
    """x: (N, in), w_t: (in, out) -> (N, out)."""
    return _rows_aligned(lambda x: x @ w_t if b is None else torch.addmm(b, x, w_t), x)


def _residual_matmul(res: Tensor, x: Tensor, w_t: Tensor, b: Tensor | None) -> Tensor:
    """res + (x @ w_t + b); without a bias the residual add happens inside the GEMM (one op)."""
    n = x.shape[0]
    if n % ROW_ALIGN:  # as _rows_aligned
        return _residual_matmul(pad_rows(res), pad_rows(x), w_t, b)[:n]
    return torch.addmm(res, x, w_t) if b is None else res + torch.addmm(b, x, w_t)


_GRAIN = 32768  # ATen's at::internal::GRAIN_SIZE: an elementwise op on fewer elements runs on one thread


def _swiglu_(gu: Tensor) -> Tensor:
    """SiLU(gate) * up for gu = [gate | up] (N, 2I), written into gu's gate half (no new (N, I)).

    On CPU in blocks of rows below ATen's grain: one op on more elements is split between threads at
    an offset that follows N, mid-row, and the piece before each split ends in the scalar exp, which
    rounds unlike the vector one; so a generator row would follow its batch. Within a block every row
    takes the same path (the gate half is strided, so the kernel loops row by row)."""
    inter = gu.shape[-1] // 2
    rows = max(1, (_GRAIN - 1) // inter) if gu.is_cpu else max(1, gu.shape[0])
    for block in gu.split(rows):
        F.silu(block[:, :inter], inplace=True).mul_(block[:, inter:])
    return gu[:, :inter]


def _rows_aligned(f, x: Tensor) -> Tensor:
    """f(x) for a row-wise GEMM f, run on a multiple of ROW_ALIGN rows (the padding rows are dropped).

    MKL rounds a row differently depending on how many rows its GEMM has: one row runs as a GEMV (on
    every CPU); on AMD EPYC (Zen 4) fewer than four rows take another kernel, and on two or more
    threads the rows of a thread's share past a multiple of four round unlike the rest. So a
    generator row's logits would depend on its batch, which follows tool timing. With a multiple of
    four rows, a row's result is the same whatever the row count, its position and the thread count
    (AMD EPYC: every row count up to 140 and some up to 1200, at 1-8 threads and several row
    offsets; on the Intel Xeon of earlier sessions every count >= 2 already was). Decode attention
    (OneTokenAttention: fixed key chunks, aligned rows, padded query rows) and SwiGLU (blocks of
    rows below ATen's grain) are made batch-invariant the same way. The cost is at most three extra
    rows per GEMM."""
    n = x.shape[0]
    return f(x) if n % ROW_ALIGN == 0 else f(pad_rows(x))[:n]
