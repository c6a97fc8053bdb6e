"""benchmarks/bench_sample.py: a tiny run prints both implementations, checked against float64, and
records nothing with --no-record."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sample.py"


@pytest.mark.skipif(not any(map(shutil.which, ("cc", "gcc", "clang"))), reason="no C compiler: no native kernel")
def test_tiny_run_checks_both_against_float64():
    out = subprocess.run([sys.executable, str(BENCH), "--rows", "6", "--vocab", "70", "300", "--temperature", "0.7",
                          "--reps", "1", "--no-record"], capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert out.returncode == 0, out.stderr
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.startswith(("torch ops", "C (cpu_sample)"))]
    assert len(rows) == 8, out.stdout  # 2 implementations x 2 vocabularies x (greedy, T=0.7)
    for row in rows:
        assert row[-2].startswith("6/6") and float(row[-1]) < 1e-5, row  # tokens vs float64, log-prob error
