"""The engine's decoder (Llama / Qwen2 / Qwen3), its attention backends, HF I/O and tokenizer."""

from .attention import backend_status, resolve_backend
from .config import ModelConfig, RopeScaling
from .hf import config_from_hf, config_to_hf, load_hf, save_hf
from .kv_cache import KVCache
from .tokenizer import Tokenizer
from .transformer import Transformer, packed_positions

__all__ = [
    "KVCache", "ModelConfig", "RopeScaling", "Tokenizer", "Transformer", "backend_status", "config_from_hf",
    "config_to_hf", "load_hf", "packed_positions", "resolve_backend", "save_hf",
]
