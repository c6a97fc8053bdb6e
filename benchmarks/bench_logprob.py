"""Benchmark fused_linear_logprob against its peers: forward, backward, full step; time and memory.

    python benchmarks/bench_logprob.py                                   # CPU case: N=4096 H=512 V=32768 fp32
    python benchmarks/bench_logprob.py --n 16384 --h 4096 --v 151936 --dtype bf16   # GPU case

Implementations, side by side in one process: naive PyTorch (logits -> fp32 log_softmax -> gather),
torch.compile of it, our chunked PyTorch path (impl="torch"), our Triton kernels (CUDA only) and
Liger's LigerFusedLinearCrossEntropyLoss (when installed; it computes its grads inside the forward,
so its "fwd" includes most of the backward's work). Each is checked against the naive log-probs
before it is timed. TFLOP/s count model FLOPs (2NHV forward, 4NHV backward), not our recompute.
Peak memory is the extra memory a pass allocates (grads of hidden and weight included).
Results: printed table + one JSON line appended to benchmarks/results/bench_logprob.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_memory_mb, print_table, quantiles, record, time_fn  # noqa: E402

from sailor_engine.kernels.logprob import fused_linear_logprob  # noqa: E402
from sailor_engine.kernels.reference import naive_linear_logprob  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    # -sum(logp): the same full-step gradient as backpropagating g = -1 through the log-probs
    return lambda h, w, t: -loss(w, h, t)


def implementations(device: torch.device, compile_naive: bool) -> dict:
    impls = {"naive": lambda h, w, t: naive_linear_logprob(h, w, t)}
    if compile_naive:
        impls["torch.compile(naive)"] = torch.compile(naive_linear_logprob, dynamic=False)
    impls["ours: chunked torch"] = lambda h, w, t: fused_linear_logprob(h, w, t, impl="torch")
    if device.type == "cuda":
        impls["ours: triton"] = lambda h, w, t: fused_linear_logprob(h, w, t, impl="triton")
    liger = _liger()
    if liger is not None and device.type == "cuda":
        impls["liger FLCE (sum)"] = liger
    return impls


class Passes:
    """The forward / backward / full step of one implementation on its own copies of the leaves."""

    def __init__(self, fn, hidden, weight, targets, g, scalar: bool):
        self.fn, self.targets = fn, targets
        self.h = hidden.detach().clone().requires_grad_()
        self.w = weight.detach().clone().requires_grad_()
        self.grad = None if scalar else g  # a scalar loss (Liger) takes no upstream grad
        self.kept = None

    def fwd(self):
        return self.fn(self.h, self.w, self.targets)

    def bwd(self):  # through the graph of one kept forward
        self.h.grad = self.w.grad = None
        self.kept.backward(self.grad, retain_graph=True)

    def full(self):
        self.h.grad = self.w.grad = None
        self.fwd().backward(self.grad)

    def timed(self, name, device) -> float:
        if name == "bwd":
            self.kept = self.fwd()
        ms = time_fn(getattr(self, name), device, warmup=0, reps=1)["median_ms"]
        self.kept = self.h.grad = self.w.grad = None
        return ms


def measure(impls: dict, hidden, weight, targets, g, reps, warmup, device) -> list[dict]:
    """Round-robin over implementations and passes, so load drift on a shared machine hits all alike."""
    passes = {name: Passes(fn, hidden, weight, targets, g, name.startswith("liger")) for name, fn in impls.items()}
    # Liger computes its grads inside the forward; its backward only rescales them: not timed alone
    cases = [(n, p) for n in passes for p in ("fwd", "bwd", "full") if not (p == "bwd" and passes[n].grad is None)]
    for _ in range(warmup):
        for name, pass_name in cases:
            passes[name].timed(pass_name, device)
    samples = {case: [] for case in cases}
    for _ in range(reps):
        for name, pass_name in cases:
            samples[name, pass_name].append(passes[name].timed(pass_name, device))
    n, width, v = hidden.shape[0], hidden.shape[1], weight.shape[0]
    flops = {"fwd": 2 * n * width * v, "bwd": 4 * n * width * v, "full": 6 * n * width * v}
    rows = []
    for name, pass_name in cases:
        t = quantiles(samples[name, pass_name])
        mem = None if pass_name == "bwd" else peak_memory_mb(getattr(passes[name], pass_name), device)
        rows.append({"impl": name, "pass": pass_name, **t, "tflops": flops[pass_name] / (t["median_ms"] * 1e9),
                     "peak_mb": mem})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="tokens")
    p.add_argument("--h", type=int, default=512, help="hidden size")
    p.add_argument("--v", type=int, default=32768, help="vocab size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 7 on CPU, 20 on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1 on CPU, 3 on GPU)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the naive peer")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/results")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    reps = args.reps or (20 if device.type == "cuda" else 7)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.n, args.h, generator=gen).to(device, dtype)
    weight = (torch.randn(args.v, args.h, generator=gen) / args.h**0.5).to(device, dtype)
    targets = torch.randint(0, args.v, (args.n,), generator=gen).to(device)
    g = torch.full((args.n,), -1.0, device=device)  # d(-sum logp)/d logp, as in a CE step
    expect = naive_linear_logprob(hidden, weight, targets)

    impls, errors = {}, {}
    for name, fn in implementations(device, not args.no_compile).items():
        try:  # a peer that cannot run here is reported, not hidden
            out = fn(hidden, weight, targets)
        except Exception as exc:
            print(f"{name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue
        impls[name] = fn
        errors[name] = None if out.dim() == 0 else (out.float() - expect).abs().max().item()
        del out
    del expect
    rows = measure(impls, hidden, weight, targets, g, reps, warmup, device)

    base = {r["pass"]: r for r in rows if r["impl"] == "naive"}
    for r in rows:
        r["max_err_vs_naive"] = errors[r["impl"]]
        b = base[r["pass"]]
        r["time_vs_naive"] = r["median_ms"] / b["median_ms"]
        if r["peak_mb"] is not None and b["peak_mb"]:
            r["mem_vs_naive"] = r["peak_mb"] / b["peak_mb"]
    config = {"n": args.n, "h": args.h, "v": args.v, "dtype": args.dtype, "reps": reps, "warmup": warmup,
              "threads": torch.get_num_threads(), "timing": "round-robin over implementations and passes"}
    title = f"fused linear log-prob  N={args.n} H={args.h} V={args.v} {args.dtype} on {device}"
    cols = ["impl", "pass", "median_ms", "p20_ms", "p80_ms", "tflops", "peak_mb", "time_vs_naive", "mem_vs_naive",
            "max_err_vs_naive"]
    print_table(title, rows, cols)
    if not args.no_record:
        record("bench_logprob", config, rows, device)


if __name__ == "__main__":
    main()
