"""tools/gpu.sh, the GPU checks' entry point: on a host without CUDA it must stop before running
anything (exit 2, saying why), and every benchmark command it would run must parse its arguments."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu.sh"


def gpu_sh(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHON": python},
                          capture_output=True, text=True, timeout=120)


def test_usage():
    for args in ((), ("everything",)):
        p = gpu_sh(*args)
        assert p.returncode == 2 and "usage: tools/gpu.sh tests|bench" in p.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the guard is for hosts without CUDA")
@pytest.mark.parametrize("stage", ["tests", "bench"])
def test_no_cuda_runs_nothing(stage):
    p = gpu_sh(stage)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no CUDA device visible" in p.stderr and "+ " not in p.stdout
    p = gpu_sh(stage, python="/bin/false")
    assert p.returncode == 2 and "cannot import torch" in p.stderr


PARSE_ONLY = """
import argparse, os, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_then_stop(self, *a, **k):
    parse(self, *a, **k)  # an unknown flag or a bad value exits 2 here
    sys.exit(0)
argparse.ArgumentParser.parse_args = parse_then_stop
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python benchmarks/x.py` does
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_benchmark_commands_parse():
    """Each `run "$py" $b/bench_*.py ...` line of the bench stage parses: the benchmark runs up to its
    argparse, which rejects an unknown flag or a bad value, and stops there."""
    text = SCRIPT.read_text()
    lines = re.findall(r'run "\$py" \$b/(bench_\w+\.py)([^\n]*)', text)
    assert {name for name, _ in lines} == {"bench_logprob.py", "bench_policy_loss.py", "bench_decode_attention.py",
                                           "bench_generate.py", "bench_train_step.py"}
    for name, rest in lines:
        for dt in ("bf16", "fp32"):
            args = rest.replace("$dt", dt).split()
            p = subprocess.run([sys.executable, "-c", PARSE_ONLY, str(ROOT / "benchmarks" / name), *args], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
            assert p.returncode == 0, f"{name} {' '.join(args)}:\n{p.stderr[-2000:]}"
