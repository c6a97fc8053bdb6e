"""ParallelDims: the (pp, dp, tp) layout of a run, validated once; its process groups, built once.

    dims = ParallelDims.resolve(cfg.parallel, world_size)      # errors name the sizes
    groups = dims.build(device_type="cuda")                   # after init_process_group
    groups.tp, groups.dp, groups.pp                            # torch.distributed ProcessGroups
    groups.tp_rank, groups.dp_rank, groups.pp_rank

Rank layout: rank = (pp_rank * dp + dp_rank) * tp + tp_rank. Tensor parallelism is innermost, so a
tp group is consecutive ranks (one node's NVLink domain under torchrun's numbering), data
parallelism next, pipeline stages outermost (stages may span nodes: they exchange activations
only). Nothing here is global: the groups object is passed to whoever needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from sailor_engine.parallel.config import ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    pp: int

    def __post_init__(self) -> None:
        for axis in ("dp", "tp", "pp"):
            if getattr(self, axis) < 1:
                raise ValueError(f"parallel.{axis} must be >= 1, got {getattr(self, axis)}")

    @classmethod
    def resolve(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        """The layout for this world size; dp="auto" takes what tp * pp leave."""
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        model = cfg.tp * cfg.pp
        if world_size % model:
            raise ValueError(f"world size {world_size} is not divisible by parallel.tp * parallel.pp = "
                             f"{cfg.tp} * {cfg.pp} = {model}")
        dp = world_size // model if cfg.dp == "auto" else cfg.dp
        if dp * model != world_size:
            raise ValueError(f"parallel.dp * parallel.tp * parallel.pp = {dp} * {cfg.tp} * {cfg.pp} = {dp * model} "
                             f"!= world size {world_size}")
        return cls(dp, cfg.tp, cfg.pp)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {self.world_size}")
        return rank // (self.dp * self.tp), rank // self.tp % self.dp, rank % self.tp

    def rank(self, pp: int, dp: int, tp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    def axis_ranks(self, axis: str, rank: int) -> list[int]:
        """The global ranks of `rank`'s group along one axis ("pp", "dp" or "tp"), in axis order."""
        p, d, t = self.coords(rank)
        size = {"pp": self.pp, "dp": self.dp, "tp": self.tp}[axis]
        return [self.rank(*(i if a == axis else c for a, c in zip(("pp", "dp", "tp"), (p, d, t))))
                for i in range(size)]

    def build(self) -> "ParallelGroups":
        """Create the tp, dp and pp groups of this process (collective: every rank must call it)."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build needs torch.distributed to be initialised (torchrun)")
        world, me = dist.get_world_size(), dist.get_rank()
        if world != self.world_size:
            raise ValueError(f"layout dp={self.dp} x tp={self.tp} x pp={self.pp} = {self.world_size} ranks, "
                             f"but the world has {world}")
        groups = {}
        for axis in ("tp", "dp", "pp"):
            # new_group is collective over the world: every rank creates every group of the axis,
            # in the same order, and keeps its own.
            seen = set()
            for r in range(world):
                ranks = tuple(self.axis_ranks(axis, r))
                if ranks in seen:
                    continue
                seen.add(ranks)
                g = dist.new_group(list(ranks))
                if me in ranks:
                    groups[axis] = g
        pp, dp, tp = self.coords(me)
        return ParallelGroups(self, groups["tp"], groups["dp"], groups["pp"], tp, dp, pp)


@dataclass(frozen=True)
class ParallelGroups:
    """This process's groups along each axis, and its coordinates."""

    dims: ParallelDims
    tp: dist.ProcessGroup
    dp: dist.ProcessGroup
    pp: dist.ProcessGroup
    tp_rank: int
    dp_rank: int
    pp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1
