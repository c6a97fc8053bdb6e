"""examples/: every config loads and says what its comments say; the kernels-only script runs and checks itself.

The layout claims of the 8-GPU config are checked with the trainer's own checks: its RFT layout
resolves to tp 2 x pp 2 x dp 2 on 8 ranks and is refused by the RL trainer (pp > 1), while the RL
override of its header is accepted. The paper hyper-parameters are asserted so that an edit that
drifts from them fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from sailor_engine.config import load_config
from sailor_engine.parallel.dims import ParallelDims
from sailor_engine.train.rl import check_rl_config
from sailor_engine.train.setup import _check_wired

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RL_8GPU = ["train.mode=rl", "parallel.tp=4", "parallel.pp=1"]


def test_examples_present():
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert {"tiny.yaml", "qwen2.5-0.5b-1gpu.yaml", "llama-8b-8gpu.yaml"} <= names


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_loads(path):
    cfg = load_config(path)
    assert cfg.train.micro_batch_tokens >= cfg.max_context


def test_qwen_single_gpu_paper_hyper_parameters():
    cfg = load_config(EXAMPLES / "qwen2.5-0.5b-1gpu.yaml")
    r, rl, a = cfg.train.rft, cfg.train.rl, cfg.algo
    assert (r.lr, r.batch_size, r.schedule, r.weight_decay) == (5e-6, 32, "cosine", 0.1)
    assert (rl.lr, rl.questions_per_step, a.updates_per_batch, a.group_size) == (1e-6, 128, 4, 8)
    assert rl.questions_per_step // a.updates_per_batch == 32 and rl.steps <= 50
    assert cfg.train.dtype == "auto" and cfg.parallel.tp == cfg.parallel.pp == 1
    m = cfg.model  # Qwen2.5-0.5B
    assert (m.family, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.vocab_size) == \
        ("qwen2", 896, 24, 14, 2, 151936)
    check_rl_config(load_config(EXAMPLES / "qwen2.5-0.5b-1gpu.yaml", ["train.mode=rl"]),
                    SimpleNamespace(pp=1, dp=1), num_tasks=1000)


def test_8gpu_layouts():
    cfg = load_config(EXAMPLES / "llama-8b-8gpu.yaml")
    dims = ParallelDims.resolve(cfg.parallel, 8)
    assert (dims.tp, dims.pp, dims.dp) == (2, 2, 2) and cfg.parallel.data_parallel == "fsdp"
    _check_wired(cfg, dims)  # FSDP2 under pp: wired (train.dtype auto resolves to fp32 without CUDA)
    check_rl_config(load_config(EXAMPLES / "llama-8b-8gpu.yaml", ["train.mode=rl"]),
                    SimpleNamespace(pp=dims.pp, dp=dims.dp), num_tasks=1000)  # RL under pp: wired
    rl = load_config(EXAMPLES / "llama-8b-8gpu.yaml", RL_8GPU)
    rl_dims = ParallelDims.resolve(rl.parallel, 8)
    assert (rl_dims.tp, rl_dims.pp, rl_dims.dp) == (4, 1, 2) and rl.parallel.data_parallel == "fsdp"
    check_rl_config(rl, SimpleNamespace(pp=rl_dims.pp, dp=rl_dims.dp), num_tasks=1000)
    # Qwen2.5-7B (28 heads, 4 KV heads) fits both layouts too
    qwen_7b = ["model.hidden_size=3584", "model.num_heads=28", "model.num_kv_heads=4"]
    for overrides in ([], RL_8GPU):
        load_config(EXAMPLES / "llama-8b-8gpu.yaml", [*overrides, *qwen_7b])


def test_headers_name_the_overrides_they_use():
    """The RL command in the 8-GPU header is the override tested above."""
    text = (EXAMPLES / "llama-8b-8gpu.yaml").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    sets = re.findall(r"--set (\S+)", header)
    assert set(RL_8GPU) <= set(sets)


def test_kernels_only_example_runs():
    proc = subprocess.run([sys.executable, str(EXAMPLES / "kernels_only.py")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len([ln for ln in lines if ln.startswith("step ")]) == 6
    assert lines[-1] == "kernels match plain PyTorch: loss and every parameter gradient"
    losses = [float(m) for m in re.findall(r"update 1: loss ([-+]\d\.\d+)", proc.stdout)]
    assert len(losses) == 3 and all(x != 0 for x in losses)  # off-policy updates: a real, non-zero loss
