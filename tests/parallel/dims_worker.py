"""torchrun worker: build the groups of each 2-rank layout and check them with all_reduce."""

import torch
import torch.distributed as dist

from sailor_engine.parallel.dims import ParallelDims


def main():
    dist.init_process_group("gloo")
    me = dist.get_rank()
    for dp, tp, pp in ((1, 2, 1), (2, 1, 1), (1, 1, 2)):
        g = ParallelDims(dp, tp, pp).build()
        assert (g.pp_rank, g.dp_rank, g.tp_rank) == ParallelDims(dp, tp, pp).coords(me)
        for axis, size in (("tp", tp), ("dp", dp), ("pp", pp)):
            x = torch.ones(1)
            dist.all_reduce(x, group=getattr(g, axis))
            assert int(x) == size, (axis, int(x), size)
        assert g.is_first_stage == (g.pp_rank == 0) and g.is_last_stage == (g.pp_rank == pp - 1)
    try:
        ParallelDims(1, 4, 1).build()
    except ValueError as e:
        assert "but the world has 2" in str(e)
    else:
        raise AssertionError("a 4-rank layout on 2 ranks must fail")
    if me == 0:
        print("groups ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
