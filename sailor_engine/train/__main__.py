"""`python -m sailor_engine.train --config run.yaml [--set a.b=c ...]`: the training entry point.

    python -m sailor_engine.train --config examples/tiny.yaml --set train.data_dir=runs/tiny/data
    torchrun --nproc-per-node 8 -m sailor_engine.train --config run.yaml --set parallel.tp=2

Without torchrun it runs in this one process (no process group). Under torchrun every rank
initialises the process group (parallel.backend; auto: nccl on CUDA, gloo on CPU), takes the CUDA
device of its LOCAL_RANK and builds the tp / dp groups of the layout. A bad config or layout exits 2
with its message on stderr (every rank, no traceback), before any compute; a run stopped by the
non-finite guard (train.max_nonfinite_steps, train/guards.py) exits 3 with one line naming the step
and the last good checkpoint. train.mode picks the loop: rft (train/rft.py) or rl (train/rl.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch.distributed as dist

from sailor_engine.config import ConfigError, load_config
from sailor_engine.train.guards import TrainingStopped

PROG = "sailor_engine.train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}",
                                description="RFT or RL training (torchrun for several processes).")
    p.add_argument("--config", metavar="PATH", help="config file: .yaml, .yml, .toml or .json")
    p.add_argument("--set", action="append", default=[], metavar="A.B=VALUE",
                   help="override one field, e.g. train.rft.lr=1e-5 (repeatable; value parsed as YAML)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        # torch and the model: after the config is known good
        from sailor_engine.train.rft import train_rft
        from sailor_engine.train.rl import train_rl
        from sailor_engine.train.setup import init_runtime

        rt = init_runtime(cfg)
        try:
            (train_rl if cfg.train.mode == "rl" else train_rft)(cfg, rt)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"{PROG}: stopped: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
