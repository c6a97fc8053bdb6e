"""Shared by the torchrun workers: gather every rank's failures and worst errors, print them on rank 0."""

import torch.distributed as dist


def report(failures: list[str], worst: dict[str, float], *, label: str = "", ok_line: str) -> int:
    """Returns the process exit code: 0 when no rank failed. Collective: every rank must call it."""
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, (failures, worst))
    ok = not any(fs for fs, _ in everything)
    if dist.get_rank() == 0:
        for fs, _ in everything:
            for f in fs:
                print("MISMATCH", f)
        if ok:
            for name in worst:
                print(f"{label}{name}: max rel err {max(w[name] for _, w in everything):.1e}")
            print(ok_line)
    return 0 if ok else 1
