"""sailor_engine.kernels: fused Triton kernels for RL training, usable without the rest of the engine.

Depends on torch and triton only.
"""
