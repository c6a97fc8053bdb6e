"""What every Triton launcher here asks: interpreting on the CPU, and which CUDA device to launch on."""

from __future__ import annotations

import contextlib
import os

import torch


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors (tests), with one config and fp32 arithmetic."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_device(device: torch.device):
    """Triton launches on the current CUDA device, which need not be the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
