"""Parallel section of the config: the tensor x pipeline x data-parallel layout of a run.

A frozen msgspec Struct (validated on decode, hashable); sailor_engine.config composes it with the
other sections. Purely declarative: ParallelDims checks it against the world size and builds the
process groups once.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta


class ParallelConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How one run is laid out over torchrun's world: world_size = dp * tp * pp."""

    dp: Annotated[
        Annotated[int, Meta(ge=1)] | Literal["auto"],
        Meta(description="Data-parallel degree; 'auto' takes what is left: world_size // (tp * pp)."),
    ] = "auto"
    tp: Annotated[int, Meta(ge=1, description="Tensor-parallel degree (Megatron column/row sharding); must divide model.num_heads.")] = 1
    pp: Annotated[int, Meta(ge=1, description="Pipeline stages (balanced layer partition, 1F1B schedule); at most model.num_layers.")] = 1
    pp_microbatches: Annotated[int, Meta(ge=1, description="Micro-batches in flight per pipeline step (1F1B training, pipelined decode); >= pp, the bubble is (pp - 1) / (m + pp - 1).")] = 8
    sequence_parallel: Annotated[bool, Meta(description="Shard norm and dropout activations along the sequence over the tp axis (needs tp > 1).")] = False
    data_parallel: Annotated[Literal["fsdp", "ddp"], Meta(description="How the dp axis holds parameters: FSDP2 fully_shard, or replicated DDP.")] = "fsdp"
    backend: Annotated[Literal["auto", "nccl", "gloo"], Meta(description="torch.distributed backend; auto: nccl on CUDA, gloo on CPU.")] = "auto"
    timeout_s: Annotated[float, Meta(gt=0, description="Process-group timeout in seconds (init and every collective).")] = 600.0

    def __post_init__(self) -> None:
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel needs parallel.tp > 1, got tp = 1")
        if self.pp > 1 and self.pp_microbatches < self.pp:
            raise ValueError(f"parallel.pp_microbatches ({self.pp_microbatches}) must be >= parallel.pp ({self.pp}) "
                             "to fill the pipeline")
