"""ParallelDims: layout validation, rank <-> coordinate maps, and real groups under torchrun (gloo)."""

import itertools
from pathlib import Path

import pytest

from sailor_engine.parallel.config import ParallelConfig
from sailor_engine.parallel.dims import ParallelDims


@pytest.mark.parametrize("world,cfg,want", [
    (8, ParallelConfig(tp=2, pp=2), (2, 2, 2)),
    (8, ParallelConfig(tp=8), (1, 8, 1)),
    (6, ParallelConfig(dp=3, tp=2), (3, 2, 1)),
    (1, ParallelConfig(), (1, 1, 1)),
])
def test_resolve(world, cfg, want):
    d = ParallelDims.resolve(cfg, world)
    assert (d.dp, d.tp, d.pp) == want and d.world_size == world


@pytest.mark.parametrize("world,cfg,msg", [
    (6, ParallelConfig(tp=4), r"world size 6 is not divisible by parallel.tp \* parallel.pp = 4 \* 1 = 4"),
    (8, ParallelConfig(dp=3, tp=2), r"parallel.dp \* parallel.tp \* parallel.pp = 3 \* 2 \* 1 = 6 != world size 8"),
    (0, ParallelConfig(), "world size must be >= 1"),
])
def test_impossible_layouts_name_the_sizes(world, cfg, msg):
    with pytest.raises(ValueError, match=msg):
        ParallelDims.resolve(cfg, world)
    with pytest.raises(ValueError, match="parallel.tp must be >= 1, got 0"):
        ParallelDims(1, 0, 1)


@pytest.mark.parametrize("dp,tp,pp", [(2, 2, 2), (3, 1, 2), (1, 4, 1), (2, 3, 1)])
def test_coordinates_and_groups_partition_the_world(dp, tp, pp):
    d = ParallelDims(dp, tp, pp)
    seen = {d.coords(r) for r in range(d.world_size)}
    assert seen == set(itertools.product(range(pp), range(dp), range(tp)))
    for r in range(d.world_size):
        assert d.rank(*d.coords(r)) == r
        assert d.axis_ranks("tp", r) == list(range(r - r % tp, r - r % tp + tp))  # tp innermost: consecutive
        for axis, size in (("tp", tp), ("dp", dp), ("pp", pp)):
            group = d.axis_ranks(axis, r)
            assert len(group) == size and r in group
            others = [a for a in ("pp", "dp", "tp") if a != axis]
            idx = {"pp": 0, "dp": 1, "tp": 2}
            assert all(d.coords(g)[idx[o]] == d.coords(r)[idx[o]] for g in group for o in others)


@pytest.mark.dist
def test_groups_under_torchrun(run_workers):
    assert "groups ok" in run_workers(Path(__file__).with_name("dims_worker.py"))
