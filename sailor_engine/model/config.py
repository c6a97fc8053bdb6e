"""Model section of the config: the architecture of a Llama / Qwen2 / Qwen3 decoder.

A frozen msgspec Struct (validated on decode, hashable); sailor_engine.config composes it with the
other sections and handles loading and overrides.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta


class RopeScaling(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Llama-3 style RoPE frequency scaling (rope_type "llama3")."""

    factor: Annotated[float, Meta(gt=0, description="Context extension factor.")] = 8.0
    low_freq_factor: Annotated[float, Meta(gt=0, description="Wavelengths above original/low_freq_factor are scaled by 1/factor.")] = 1.0
    high_freq_factor: Annotated[float, Meta(gt=0, description="Wavelengths below original/high_freq_factor are kept.")] = 4.0
    original_max_position_embeddings: Annotated[int, Meta(ge=1, description="Context length the model was pre-trained at.")] = 8192


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A Llama / Qwen2 / Qwen3 decoder."""

    family: Annotated[Literal["llama", "qwen2", "qwen3"], Meta(description="Architecture family (HF model_type).")] = "qwen2"
    vocab_size: Annotated[int, Meta(ge=1, description="Vocabulary size (rows of the embedding).")] = 32000
    hidden_size: Annotated[int, Meta(ge=1, description="Residual stream width.")] = 256
    intermediate_size: Annotated[int, Meta(ge=1, description="SwiGLU inner width.")] = 688
    num_layers: Annotated[int, Meta(ge=1, description="Decoder layers.")] = 4
    num_heads: Annotated[int, Meta(ge=1, description="Query heads.")] = 4
    num_kv_heads: Annotated[int, Meta(ge=1, description="Key/value heads (GQA); must divide num_heads.")] = 4
    head_dim: Annotated[int | None, Meta(description="Per-head width; None means hidden_size // num_heads.")] = None
    rope_theta: Annotated[float, Meta(gt=0, description="RoPE base.")] = 10000.0
    rope_scaling: Annotated[RopeScaling | None, Meta(description="Llama-3 RoPE scaling, or None.")] = None
    rms_norm_eps: Annotated[float, Meta(gt=0, description="RMSNorm epsilon.")] = 1e-6
    qkv_bias: Annotated[bool, Meta(description="Bias on q/k/v projections (Qwen2).")] = False
    o_bias: Annotated[bool, Meta(description="Bias on the attention output projection.")] = False
    mlp_bias: Annotated[bool, Meta(description="Bias on the MLP projections.")] = False
    qk_norm: Annotated[bool, Meta(description="Per-head RMSNorm on q and k before RoPE (Qwen3).")] = False
    tie_word_embeddings: Annotated[bool, Meta(description="LM head shares the embedding matrix.")] = True
    max_position_embeddings: Annotated[int, Meta(ge=1, description="Longest supported sequence.")] = 4096
    attn_backend: Annotated[
        Literal["auto", "flash_attn", "xformers", "flex", "native", "sdpa"],
        Meta(description="Attention backend for packed sequences (native: the C kernel, CPU fp32); auto picks "
                         "the best available."),
    ] = "auto"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_kv_heads ({self.num_kv_heads}) must divide model.num_heads ({self.num_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads "
                             f"({self.num_heads}) when model.head_dim is not set")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads
