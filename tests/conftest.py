"""Test-wide settings: CPU by default; Triton kernels run under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton.jit decorates anything, hence here, before any test
module imports sailor_engine.kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
