"""Plain PyTorch references for every kernel in sailor_engine.kernels.

Used by the tests (run in float64 they are the ground truth), by the benchmarks (as the naive
peer) and as readable specifications of what each kernel computes.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------
# fused linear log-prob
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# policy loss
# ---------------------------------------------------------------------------------------------
