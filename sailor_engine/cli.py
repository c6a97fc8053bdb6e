"""The `sailor-engine` command line (also `python -m sailor_engine`).

    sailor-engine info                      versions, CUDA devices, Triton mode, attention backends
    sailor-engine config [--fields]         the resolved config (or every field: type, default, meaning)
    sailor-engine synth --out DIR           tasks, offline web and tokenizer from a knowledge graph
    sailor-engine demo                      synth -> drills -> RFT -> RL -> eval on the embedded world, on the CPU
    sailor-engine rft | rl                  training (= python -m sailor_engine.train; torchrun for more ranks)
    sailor-engine eval --model DIR          pass@1 on the held-out tasks, by level and hops, with 95% intervals
    sailor-engine export CKPT --out DIR     a training checkpoint (any tp layout) -> one HF directory

Every command that reads a config takes `--config PATH` (.yaml / .yml / .toml / .json) and repeated
`--set section.field=value`; the fields themselves are declared once, in the config Structs. A bad
config exits with status 2 and its message on stderr, no traceback.

Adding a command: write `def name(args) -> int | None` and add one `Command(...)` line to COMMANDS.
Heavy imports (torch, the synthesis pipeline) stay inside the command that needs them, so the CLI
starts fast.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

from sailor_engine import __version__
from sailor_engine.config import FORMATS, Config, ConfigError, config_fields, dump_config, load_config


def arg(*flags: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One argparse argument, written as in add_argument."""
    return flags, kwargs


class Command(NamedTuple):
    name: str
    run: Callable[[argparse.Namespace], int | None]
    help: str
    args: tuple = ()  # arg(...) entries
    config: bool = False  # takes --config and --set


def _config(args: argparse.Namespace, *overrides: str) -> Config:
    return load_config(args.config, [*args.set, *overrides])


# --- info ---------------------------------------------------------------------------------------------

_PACKAGES = ("torch", "triton", "transformers", "numba", "msgspec", "uvloop", "safetensors", "tokenizers")


def _version(package: str) -> str:
    try:  # read from the installed metadata: importing transformers alone takes seconds
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _devices(torch: Any) -> list[str]:
    if not torch.cuda.is_available():
        return ["none"]
    rows = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        rows.append(f"{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    return rows


def _triton_mode(cuda: bool) -> str:
    if _version("triton") == "not installed":
        return "unavailable: triton not installed (kernels use the PyTorch path)"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "interpreter (TRITON_INTERPRET=1)"
    if cuda:
        return "GPU"
    return "unavailable: no CUDA device (kernels use the chunked PyTorch path; TRITON_INTERPRET=1 for the interpreter)"


def _distributed(dist: Any) -> str:
    if not dist.is_available():
        return "unavailable (torch built without torch.distributed)"
    backends = (("nccl", dist.is_nccl_available), ("gloo", dist.is_gloo_available))
    return ", ".join(f"{name}: {'available' if ok() else 'unavailable'}" for name, ok in backends)


def info(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from sailor_engine.kernels import cpu_attention, cpu_decoder, cpu_flash, cpu_sample
    from sailor_engine.model.attention import backend_status

    python = f"{platform.python_version()} ({platform.python_implementation()}, {platform.system()} {platform.machine()})"
    rows: list[tuple[str, list[str]]] = [("sailor-engine", [__version__]), ("python", [python])]
    # torch's own version string: it carries the build (2.11.0+cu130) that the wheel's metadata drops
    rows += [(name, [torch.__version__ if name == "torch" else _version(name)]) for name in _PACKAGES]
    rows += [
        ("torch build", [f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"]),
        ("CUDA devices", _devices(torch)),
        ("CPU threads", [str(torch.get_num_threads())]),
        ("Triton", [_triton_mode(torch.cuda.is_available())]),
        ("distributed", [_distributed(dist)]),
        ("attention", [f"{name}: {state}" for name, state in backend_status().items()]),
        ("C kernels", [f"attention: {cpu_attention.status()}", f"decoder: {cpu_decoder.status()}",
                       f"training attention: {cpu_flash.status()}", f"sampling: {cpu_sample.status()}"]),
    ]
    width = max(len(name) for name, _ in rows) + 2
    for name, lines in rows:
        for i, line in enumerate(lines):
            print(f"{name if i == 0 else '':<{width}}{line}")


# --- config -------------------------------------------------------------------------------------------

def show_config(args: argparse.Namespace) -> None:
    if not args.fields:
        sys.stdout.write(dump_config(_config(args), args.format))
        return
    # Two lines per field, since types and descriptions are long: `path: type = default`, then its meaning.
    gap = ""
    for f in config_fields():
        if "." not in f.path:  # a section
            print(f"{gap}# {f.path}: {f.description}")
            gap = "\n"
        else:
            print(f"{f.path}: {f.type}{' = ' + f.default if f.default else ''}\n    {f.description}")


# --- synth --------------------------------------------------------------------------------------------

def synth(args: argparse.Namespace) -> None:
    cfg = _config(args, *([f"synth.seed={args.seed}"] if args.seed is not None else []))
    from sailor_engine.synth.pipeline import run_synth  # numba, bm25s, tokenizers: only when needed

    run_synth(cfg.synth, args.out)


# --- demo ---------------------------------------------------------------------------------------------

def demo(args: argparse.Namespace) -> None:
    from sailor_engine.train.demo import demo_config, run_demo  # torch and the whole pipeline

    run_demo(demo_config(args.config, tuple(args.set)))


# --- eval ---------------------------------------------------------------------------------------------

def evaluate(args: argparse.Namespace) -> None:
    cfg = _config(args)

    from sailor_engine.model import Tokenizer
    from sailor_engine.rollout.format import ChatTemplate
    from sailor_engine.synth.pipeline import load_world
    from sailor_engine.train.eval import evaluate as run_eval
    from sailor_engine.train.eval import load_policy

    d = Path(cfg.train.data_dir)
    if not (d / "tasks.test.jsonl").is_file():
        raise ConfigError(f"train.data_dir = {str(d)!r}: no tasks.test.jsonl there (expected a `sailor-engine synth` output)")
    if not args.model.is_dir():
        raise ConfigError(f"--model {str(args.model)!r}: not a directory (an HF model or an engine checkpoint)")
    world = load_world(d, cfg.synth)
    system = world.system_prompt
    tasks = world.test[:args.tasks or cfg.train.eval_tasks]
    model = load_policy(args.model)
    res = run_eval(model, world.web, ChatTemplate(Tokenizer(world.tokenizer)), tasks, cfg,
                   samples=cfg.train.eval_samples if args.samples is None else args.samples, system=system,
                   seed=cfg.train.seed)
    label = "greedy" if res.mode == "greedy" else f"sampled x{res.samples} at T={res.temperature:g}"
    print(f"{args.model}: {label} pass@1 {res.pass1()}, well-formed {100 * res.format_ok():.1f}%")
    for key in ("level", "hops"):
        for v, est in res.by(key).items():
            print(f"  {key} {v}: {est}")
    if args.out:
        res.save(args.out)
        print(f"wrote {args.out}")


# --- rft / export -------------------------------------------------------------------------------------

def _train(args: argparse.Namespace, mode: str) -> int:
    """python -m sailor_engine.train with this command's --config / --set, in train.mode `mode`."""
    from sailor_engine.train.__main__ import main as train_main

    argv = (["--config", args.config] if args.config else []) + [a for s in args.set for a in ("--set", s)]
    return train_main(argv + ["--set", f"train.mode={mode}"])


def rft(args: argparse.Namespace) -> int:
    return _train(args, "rft")


def rl(args: argparse.Namespace) -> int:
    return _train(args, "rl")


def export(args: argparse.Namespace) -> None:
    import torch

    from sailor_engine.parallel.checkpoint import export_hf

    export_hf(args.checkpoint, args.out, dtype={"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    print(f"wrote {args.out}")


COMMANDS = (
    Command("info", info, "print versions, CUDA devices, the Triton mode and the attention backends"),
    Command("config", show_config, "print the resolved config, or with --fields every field", config=True, args=(
        arg("--format", choices=FORMATS, default="yaml", help="output format (default: yaml)"),
        arg("--fields", action="store_true", help="list every field with its type, default and description"),
    )),
    Command("synth", synth, "synthesize tasks, the offline web and a tokenizer into DIR", config=True, args=(
        arg("--out", type=Path, required=True, metavar="DIR", help="output directory"),
        arg("--seed", type=int, help="overrides synth.seed"),
    )),
    Command("demo", demo, "synth -> drills -> RFT -> RL -> held-out eval on the embedded synthetic world (CPU, 10.5-14.5 min on 2 cores)",
            config=True),
    Command("eval", evaluate, "pass@1 of a model (HF directory or checkpoint) on the held-out tasks of train.data_dir",
            config=True, args=(
        arg("--model", type=Path, required=True, metavar="DIR", help="HF directory or engine checkpoint"),
        arg("--tasks", type=int, help="held-out tasks evaluated (default: train.eval_tasks)"),
        arg("--samples", type=int, help="0: greedy; k: k sampled episodes per task (default: train.eval_samples)"),
        arg("--out", type=Path, metavar="FILE", help="write the summary and every task's outcome as JSON"),
    )),
    Command("rft", rft, "RFT training on expert trajectories (one process; use torchrun -m sailor_engine.train for more)",
            config=True),
    Command("rl", rl, "RL training, DUPO / V2 (one process; use torchrun -m sailor_engine.train for more)", config=True),
    Command("export", export, "write one HF directory from a training checkpoint of any tp layout", args=(
        arg("checkpoint", type=Path, help="a checkpoint directory (out_dir/checkpoints/step-N)"),
        arg("--out", type=Path, required=True, metavar="DIR", help="output HF directory"),
        arg("--dtype", choices=("keep", "fp32", "bf16"), default="keep", help="weights dtype (default: as saved)"),
    )),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sailor-engine", description="Train web-research agents the WebSailor way.")
    parser.add_argument("--version", action="version", version=f"sailor-engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.config:
            p.add_argument("--config", metavar="PATH", help="config file: .yaml, .yml, .toml or .json")
            p.add_argument("--set", action="append", default=[], metavar="A.B=VALUE",
                           help="override one field, e.g. train.rl.lr=1e-6 (repeatable; value parsed as YAML)")
        for flags, kwargs in cmd.args:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except ConfigError as e:
        print(f"sailor-engine {args.command}: error: {e}", file=sys.stderr)
        return 2
