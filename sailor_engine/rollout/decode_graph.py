"""The generator's decode step replayed from CUDA graphs, one per batch-size bucket.

    graphs = DecodeGraphs(model, cache, scratch_slot=cache.num_slots - 1, max_batch=64)
    logits = graphs(ids, slots)        # ids, slots: (R,) one token per row -> (R, V) fp32 logits

Why: a decode step of a small or medium model on a GPU is hundreds of short kernels (per layer: norms,
three projections, RoPE, cache writes, attention, MLP), and the host's launch overhead, not the GPU,
sets its pace. A CUDA graph launches the whole step at once.

How: the step is Transformer.forward_decode, whose shapes depend on the batch size alone and which
never reads device memory on the host, followed by the LM head. R rows run in the smallest bucket
B >= R (1, 2, 4, 8, then multiples of 8 up to max_batch); the B - R padding rows decode token 0 into
the scratch cache row, whose length the graph resets to 0 at its end, and their logits are dropped.
A bucket's graph is captured at its first use (a warm-up run on a side stream first: Triton compiles,
cuBLAS allocates its workspace), into one memory pool shared by all buckets (they never run at once).

Capture reads the parameters and buffers at their addresses: optimizer steps update them in place and
are seen, but a parameter replaced by a new tensor is not, so each call compares the addresses and
recaptures when they moved (~10 us a call). Autocast state is part of a graph's key.

capture=False runs the same step eagerly (the CPU tests, and a debugging aid): same shapes, same padding,
no graph. Numerics: decode attention is the Triton kernel here and OneTokenAttention in the eager
generator step, and the GEMMs run B rows instead of R, so logits agree with the eager step to rounding,
not bit for bit.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from sailor_engine.model.attention import KVCache
from sailor_engine.model.transformer import Transformer


def buckets(max_batch: int) -> list[int]:
    """Batch sizes a graph is captured for: 1, 2, 4, 8, 16, 24, ... up to max_batch, which is always one."""
    small = [b for b in (1, 2, 4) if b < max_batch]
    return small + list(range(8, max_batch, 8)) + [max_batch]


class DecodeGraphs:
    """CUDA graphs of model.forward_decode + logits per batch bucket (see the module docstring)."""

    def __init__(self, model: Transformer, cache: KVCache, *, scratch_slot: int, max_batch: int,
                 capture: bool = True, attn_impl: str = "auto"):
        device = cache.lengths.device
        if capture and device.type != "cuda":
            raise ValueError(f"DecodeGraphs: capture needs a CUDA cache, got one on {device} (capture=False runs eagerly)")
        if not 0 <= scratch_slot < cache.num_slots:
            raise ValueError(f"DecodeGraphs: scratch_slot {scratch_slot} is not a row of the cache ({cache.num_slots} rows)")
        self.model, self.cache, self.scratch, self.capture, self.attn_impl = model, cache, scratch_slot, capture, attn_impl
        self.buckets = buckets(max_batch)
        self.ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slots = torch.full((max_batch,), scratch_slot, dtype=torch.int64, device=device)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self._addresses: list[int] | None = None
        self.stats = {"replays": 0, "captures": 0}

    def __call__(self, ids: Tensor, slots: Tensor) -> Tensor:
        """ids, slots: (R,) int64 on the cache's device, R <= max_batch, slots distinct and not the
        scratch row, each row's length < capacity. Returns (R, V) fp32 logits, valid until the next call;
        advances cache.lengths[slots] by one."""
        R = len(ids)
        B = next(b for b in self.buckets if b >= R)
        if self.capture:
            self._check_addresses()
            key = (B, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
            if key not in self.graphs:  # before this call's inputs are written: capture overwrites them
                self.graphs[key] = self._capture(B)
        self.ids[:R].copy_(ids)
        self.slots[:R].copy_(slots)
        self.ids[R:B].zero_()
        self.slots[R:B].fill_(self.scratch)
        if not self.capture:
            return self._step(B)[:R]
        graph, logits = self.graphs[key]
        graph.replay()
        self.stats["replays"] += 1
        return logits[:R]

    def _step(self, B: int) -> Tensor:
        hidden = self.model.forward_decode(self.ids[:B], self.cache, self.slots[:B], attn_impl=self.attn_impl)
        logits = self.model.logits(hidden).float()
        self.cache.lengths[self.scratch : self.scratch + 1].zero_()  # padding rows never grow the scratch row
        return logits

    def _capture(self, B: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # Warm-up and capture run with every row on the scratch row, so no real row is touched.
        self.ids[:B].zero_()
        self.slots[:B].fill_(self.scratch)
        stream = torch.cuda.Stream(self.ids.device)
        stream.wait_stream(torch.cuda.current_stream(self.ids.device))
        with torch.cuda.stream(stream):
            self._step(B)
        torch.cuda.current_stream(self.ids.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(B)
        self.stats["captures"] += 1
        return graph, logits

    def _check_addresses(self) -> None:
        m = self.model
        addresses = [t.data_ptr() for t in itertools.chain(m.parameters(), m.buffers())]
        if addresses != self._addresses:
            self.graphs.clear()
            self._addresses = addresses
