"""Benchmark policy_loss against eager PyTorch and torch.compile: forward, backward, full; GB/s and memory.

    python benchmarks/bench_policy_loss.py                                  # CPU case: N=65536 fp32
    python benchmarks/bench_policy_loss.py --device cuda --dtype bf16 --n 16777216   # GPU, HBM-bound

Implementations, side by side in one process: eager PyTorch (policy_loss_reference: the formula as
a trainer writes it, computing in the input dtype), torch.compile of it, and ours (policy_loss,
impl="auto": the PyTorch path on CPU, the Triton kernels on CUDA). Each is checked against the
float64 reference before it is timed. Config: per-token advantages, dual clip c = 3, random mask
(~80% tokens), optional KL k3 term (--kl). grad_out is a materialised fp32 tensor (the worst case;
an expanded scalar from loss.sum() costs no bytes).

Byte model (per token, each tensor read or written once, the same for every implementation so
GB/s is a common speed unit): fwd = inputs (logp, old_logp, advantages, mask [, ref_logp]) +
loss (4 B) + saved d loss / d logp (4 B); bwd = grad_out (4 B) + d loss / d logp (4 B) + mask +
grad (logp's dtype); full = fwd + bwd. That is the traffic our two kernels need; "% HBM" divides
it by the device's peak bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s; PCIe H100 2.0 TB/s).
Results: printed table + one JSON line appended to benchmarks/results/bench_policy_loss.jsonl.

CPU notes: on a shared machine pass --threads 1 (with 2 intra-op threads, OpenMP barriers of the
many small ops stall for tens of ms whenever another process holds a core). CPU peak_mb comes
from common.peak_memory_mb (the profiler's self allocations of each op); results recorded before
that walk was corrected (commit 'benchmarks/common: CPU peak memory from each event's self
allocations') over-count chains of casts. The process RSS growth of one fwd+bwd at N=4M fp32 with
KL is an independent check (measured: ours 70 MiB, i.e. the outputs; eager 422 MiB).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_memory_mb, print_table, record, time_fn  # noqa: E402

from sailor_engine.kernels.policy_loss import policy_loss  # noqa: E402
from sailor_engine.kernels.reference import policy_loss_reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEAK_TBPS = {"H100 PCIe": 2.0, "H100": 3.35, "H200": 4.8, "A100": 2.0}  # first match in the device name


def make_inputs(n: int, dtype: torch.dtype, device: torch.device, kl: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(n, generator=gen) * 4
    inputs = {
        "logp": logp.to(device, dtype),
        "old_logp": (logp + torch.randn(n, generator=gen) * 0.2).to(device, dtype),
        "advantages": torch.randn(n, generator=gen).to(device, dtype),
        "loss_mask": (torch.rand(n, generator=gen) < 0.8).to(device),
    }
    if kl:
        inputs["ref_logp"] = (logp + torch.randn(n, generator=gen) * 0.1).to(device, dtype)
    return inputs


def implementations(compile_eager: bool) -> dict:
    eager = lambda x, **kw: policy_loss_reference(**x, **kw)[0]  # noqa: E731
    impls = {"eager": eager}
    if compile_eager:
        compiled = torch.compile(policy_loss_reference, dynamic=False)
        impls["torch.compile(eager)"] = lambda x, **kw: compiled(**x, **kw)[0]
    impls["ours"] = lambda x, **kw: policy_loss(**x, **kw)[0]
    return impls


def bytes_per_pass(inputs: dict) -> dict[str, int]:
    n = inputs["logp"].numel()
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    fwd = sum(size(t) for t in inputs.values()) + 8 * n
    bwd = (4 + 4) * n + size(inputs["loss_mask"]) + size(inputs["logp"])
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}


def bench_one(name, fn, inputs, kw, reps, warmup, device):
    """Rows for the forward, backward and full passes of one implementation."""
    logp = inputs["logp"].detach().clone().requires_grad_()
    x = dict(inputs, logp=logp)
    out = fn(x, **kw)
    g = torch.rand(out.shape, device=device, dtype=out.dtype)

    def forward():
        return fn(x, **kw)

    def backward():
        return torch.autograd.grad(out, logp, g, retain_graph=True)

    def full():
        return torch.autograd.grad(fn(x, **kw), logp, g)

    nbytes = bytes_per_pass(inputs)
    peak = next((tb for key, tb in PEAK_TBPS.items() if key in torch.cuda.get_device_name(device)), None) \
        if device.type == "cuda" else None
    rows = []
    for pass_name, f in (("fwd", forward), ("bwd", backward), ("full", full)):
        t = time_fn(f, device, warmup=warmup, reps=reps)
        gbps = nbytes[pass_name] / (t["median_ms"] * 1e6)
        mem = peak_memory_mb(f, device) if pass_name != "bwd" else None
        rows.append({"impl": name, "pass": pass_name, **t, "gb_s": gbps,
                     "hbm_pct": 100 * gbps / (peak * 1e3) if peak else None, "peak_mb": mem})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=65536, help="tokens")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kl", action="store_true", help="add ref_logp and a k3 KL term (kl_coef 0.01)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10 on CPU, 50 on GPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the eager peer")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/results")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (50 if device.type == "cuda" else 10)
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 2)

    inputs = make_inputs(args.n, dtype, device, args.kl)
    kw = {"dual_clip": 3.0, **({"kl_coef": 0.01, "kl_estimator": "k3"} if args.kl else {})}
    as64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    expect = policy_loss_reference(**as64, **kw)[0]

    rows = []
    for name, fn in implementations(not args.no_compile).items():
        try:
            err = (fn(inputs, **kw).double() - expect).abs().max().item()
        except Exception as exc:  # a peer that cannot run here is reported, not hidden
            print(f"{name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue
        for r in bench_one(name, fn, inputs, kw, reps, warmup, device):
            r["max_err_vs_fp64"] = err
            rows.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base = {r["pass"]: r for r in rows if r["impl"] == "eager"}
    for r in rows:
        r["speedup_vs_eager"] = base[r["pass"]]["median_ms"] / r["median_ms"] if r["pass"] in base else None
    config = {"n": args.n, "dtype": args.dtype, "kl": args.kl, "dual_clip": 3.0, "reps": reps, "warmup": warmup,
              "threads": torch.get_num_threads(), "bytes": bytes_per_pass(inputs)}
    title = f"policy loss  N={args.n} {args.dtype}{' +KL' if args.kl else ''} on {device}"
    cols = ["impl", "pass", "median_ms", "p20_ms", "p80_ms", "gb_s", "hbm_pct", "peak_mb", "speedup_vs_eager",
            "max_err_vs_fp64"]
    print_table(title, rows, cols)
    if not args.no_record:
        record("bench_policy_loss", config, rows, device)


if __name__ == "__main__":
    main()
