"""Benchmark the training attention on the CPU: the C kernel (backend native) vs SDPA, forward + backward.

    python benchmarks/bench_train_attention.py                         # the demo's RFT step, fp32
    python benchmarks/bench_train_attention.py --lens 2048x4 --heads 14 --kv-heads 2 --head-dim 64

One "step" is what a packed micro-batch costs the model's attention: every layer's forward and
backward over the same sequence lengths. Default shapes: the demo model (4 layers, 4 query / 2 kv
heads, head_dim 32) on 16 sequences of 160-1033 tokens, spread like its RFT batches (mean ~550).
Implementations, side by side in one process, each checked against a float64 reference first:
- `cpu_flash.flash_varlen` (csrc/cpu_flash.c, what model.attn_backend=native runs), all sequences in
  one call;
- SDPA (torch's CPU flash kernel, what backend sdpa runs), one call per sequence as VarlenAttention does.
FLOPs count the causal half only: 4 d per score forward (QK^T, PV), 10 d backward (recomputed QK^T,
dV, dP, dQ, dK). Results: the table and one JSON line in benchmarks/results/bench_train_attention.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, record, time_fn  # noqa: E402

from sailor_engine.kernels import cpu_flash  # noqa: E402
from sailor_engine.kernels.reference import varlen_attention_reference  # noqa: E402

# 16 lengths with the spread of the demo's RFT batches (theirs: mean ~553, longest ~1030; these: 557, 1033)
DEMO_LENS = "553,1033,291,612,447,839,160,702,388,530,975,244,661,410,566,497"


def parse_lens(text: str) -> list[int]:
    """"553,1033" or "2048x4" (four of 2048)."""
    if "x" in text:
        n, times = text.split("x")
        return [int(n)] * int(times)
    return [int(x) for x in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lens", default=DEMO_LENS, help="sequence lengths, comma separated, or LENxCOUNT")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/results")
    args = ap.parse_args()
    if not cpu_flash.available():
        sys.exit(f"bench_train_attention: the C kernel is not built here: {cpu_flash.status()}")
    lens, H, kvh, d = parse_lens(args.lens), args.heads, args.kv_heads, args.head_dim
    N = sum(lens)
    cu = torch.tensor([0, *lens]).cumsum(0)
    g = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(N, H, d, generator=g), torch.randn(N, kvh, d, generator=g),
               torch.randn(N, kvh, d, generator=g)) for _ in range(args.layers)]
    dout = torch.randn(N, H, d, generator=g)

    def native(q, k, v):
        return cpu_flash.flash_varlen(q, k, v, cu)

    def sdpa(q, k, v):
        outs = [F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                               vs.transpose(0, 1)[None], is_causal=True, enable_gqa=H != kvh)
                [0].transpose(0, 1) for qs, ks, vs in zip(q.split(lens), k.split(lens), v.split(lens))]
        return torch.cat(outs)

    def step(fn, backward=True):
        def run():
            for q, k, v in inputs:
                if backward:
                    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
                    fn(q, k, v).backward(dout)
                else:
                    with torch.no_grad():
                        fn(q, k, v)
        return run

    # the float64 reference on the first layer: forward and dq, the larger relative error of the two
    qd = inputs[0][0].double().requires_grad_()
    want = varlen_attention_reference(qd, *(x.double() for x in inputs[0][1:]), cu)
    want.backward(dout.double())
    rows = []
    ref_err = {}
    for name, fn in (("sdpa (torch CPU flash)", sdpa), ("native (csrc/cpu_flash.c)", native)):
        q = inputs[0][0].detach().requires_grad_()
        out = fn(q, *inputs[0][1:])
        out.backward(dout)
        ref_err[name] = max(((out.double() - want).abs().max() / want.abs().max()).item(),
                            ((q.grad.double() - qd.grad).abs().max() / qd.grad.abs().max()).item())
    scores = sum(L * (L + 1) / 2 for L in lens) * H * args.layers
    for name, fn in (("sdpa (torch CPU flash)", sdpa), ("native (csrc/cpu_flash.c)", native)):
        fwd = time_fn(step(fn, backward=False), "cpu", reps=args.reps)
        both = time_fn(step(fn), "cpu", reps=args.reps)
        rows.append({"impl": name, "fwd_ms": fwd["median_ms"], "fwd+bwd_ms": both["median_ms"],
                     "p20_ms": both["p20_ms"], "p80_ms": both["p80_ms"],
                     "fwd_GFLOPS": scores * 4 * d / (fwd["median_ms"] * 1e-3) / 1e9,
                     "fwd+bwd_GFLOPS": scores * 14 * d / (both["median_ms"] * 1e-3) / 1e9, "rel_err": ref_err[name]})
    print_table(f"training attention: {len(lens)} sequences ({N} tokens, longest {max(lens)}) x {args.layers} layers, "
                f"{H}/{kvh} heads x d{d}, fp32, {torch.get_num_threads()} threads", rows,
                ["impl", "fwd_ms", "fwd+bwd_ms", "p20_ms", "p80_ms", "fwd_GFLOPS", "fwd+bwd_GFLOPS", "rel_err"])
    if not args.no_record:
        record("bench_train_attention", {**{k: v for k, v in vars(args).items() if k != "no_record"},
                                         "threads": torch.get_num_threads()}, rows, "cpu")


if __name__ == "__main__":
    main()
