"""benchmarks/bench_train_attention.py: a tiny run prints both implementations, checked against float64,
and records nothing with --no-record."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train_attention.py"


@pytest.mark.skipif(not any(map(shutil.which, ("cc", "gcc", "clang"))), reason="no C compiler: no native kernel")
def test_tiny_run_checks_both_against_float64():
    out = subprocess.run([sys.executable, str(BENCH), "--lens", "70,1,33", "--layers", "1", "--heads", "4",
                          "--kv-heads", "2", "--head-dim", "16", "--reps", "1", "--no-record"],
                         capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert out.returncode == 0, out.stderr
    rows = [ln for ln in out.stdout.splitlines() if ln.lstrip().startswith(("sdpa", "native"))]
    assert len(rows) == 2, out.stdout
    for row in rows:
        assert float(row.split()[-1]) < 1e-5, row  # rel_err against float64
