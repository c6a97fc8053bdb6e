"""Shared benchmark plumbing: timing, peak memory, the printed table and the JSON record.

Every bench_*.py measures implementations side by side in one process and appends one JSON record
per run to benchmarks/results/<name>.jsonl with the device, date and commit, so numbers from
different machines are never mixed up. Timing: CUDA events on GPU (triton.testing.do_bench when
present), wall clock on CPU; median with p20 / p80.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({platform.machine()}, {os.cpu_count()} cores)"


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), e.g. 'AMD EPYC': BLAS kernels, and so timings and
    rounding, differ between vendors (MKL on AMD Zen 4 vs Intel Xeon)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def quantiles(samples_ms: list[float]) -> dict[str, float]:
    s = sorted(samples_ms)
    pick = lambda q: s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]  # noqa: E731
    return {"median_ms": statistics.median(s), "p20_ms": pick(0.2), "p80_ms": pick(0.8)}


def time_fn(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 2, reps: int = 10) -> dict[str, float]:
    """Median / p20 / p80 milliseconds of fn() on the device."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return quantiles(samples)


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> float:
    """Peak memory allocated while fn() runs, above what was allocated before, in MiB.

    CUDA: the caching allocator's peak. CPU: torch's CPU allocations are not traced by tracemalloc,
    so the process RSS high-water mark is not usable either (it never goes down); we use the CPU
    profiler's memory accounting instead, which records every tensor allocation and free. It may
    under-report torch.compile'd code, whose buffers are not all tensor allocations.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each event contributes its *self* bytes (an op's total includes its children's: linear ->
    # matmul -> mm would count one tensor three times): allocations at its start, and a net free
    # (tensors released inside an op, e.g. an autograd.Function) at its end, which can only
    # overstate the peak.
    steps = sorted((e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end, e.self_cpu_memory_usage)
                   for e in prof.events() if e.self_cpu_memory_usage != 0)
    cur = peak = 0
    for _, nbytes in steps:
        cur += nbytes
        peak = max(peak, cur)
    return peak / 2**20


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(f"\n{title}")
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def record(name: str, config: dict, rows: list[dict], device: torch.device | str) -> Path:
    """Append one run to benchmarks/results/<name>.jsonl and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.jsonl"
    entry = {
        "benchmark": name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "config": config,
        "rows": rows,
    }
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    print(f"\nresults appended to {path.relative_to(RESULTS.parent.parent)}")
    return path
