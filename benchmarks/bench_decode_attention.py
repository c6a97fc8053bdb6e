"""Benchmark decode attention over the slab KV cache: the Triton kernel vs the eager paths; GB/s.

    python benchmarks/bench_decode_attention.py --device cuda                       # bf16, batch 64, 4k context
    python benchmarks/bench_decode_attention.py --device cuda --batch 8 --context 32768
    python benchmarks/bench_decode_attention.py --dtype fp32 --batch 4 --context 256    # CPU, small

Implementations, side by side in one process, each checked against the float64 reference first:
- `decode_attention` (kernels/decode_attention.py): Triton on CUDA (rows and lengths as device
  tensors, split-K), its PyTorch path on CPU;
- `OneTokenAttention` (model/attention.py): the eager generator's batched decode path (three bmms
  over views of the cache rows, host-side shapes);
- SDPA over the rows gathered from the cache and padded to the longest (what a generic trainer does).

Rows get lengths spread over [context / 2, context], in shuffled cache slots. Byte model: each row's
visible keys and values read once (2 * nvis * kv_heads * head_dim * itemsize), plus q and the output;
"% HBM" divides by the device's peak bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s). Results: the table
and one JSON line appended to benchmarks/results/bench_decode_attention.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, record, time_fn  # noqa: E402

from sailor_engine.kernels.decode_attention import decode_attention  # noqa: E402
from sailor_engine.kernels.reference import decode_attention_reference  # noqa: E402
from sailor_engine.model.attention import KVCache, OneTokenAttention  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEAK_TBPS = {"H100 PCIe": 2.0, "H100": 3.35, "H200": 4.8, "A100": 2.0}  # first match in the device name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096, help="cache capacity; rows see context/2 .. context keys")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/results")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu" and dtype != torch.float32:
        ap.error("on CPU use --dtype fp32 (CPU bf16 matmuls are not what this measures)")
    B, H, kvh, d, cap = args.batch, args.heads, args.kv_heads, args.head_dim, args.context

    g = torch.Generator().manual_seed(0)
    cache = KVCache(1, B + 3, cap, kvh, d, dtype=dtype, device=device)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    slots = torch.randperm(B + 3, generator=g)[:B].to(device)
    start = torch.randint(cap // 2, cap, (B,), generator=g).to(device)  # the new token's position
    nvis = start + 1
    q = torch.randn(B, H, d, generator=g).to(device, dtype)
    k_layer, v_layer = cache.k[0], cache.v[0]

    def ours():
        return decode_attention(q, k_layer, v_layer, slots, nvis)

    one = OneTokenAttention(cache, slots, start)

    def eager():
        return one(0, q)

    def sdpa():
        keys = k_layer.index_select(0, slots).transpose(-1, -2)  # (B, kvh, cap, d)
        vals = v_layer.index_select(0, slots)
        mask = torch.arange(cap, device=device)[None, :] < nvis[:, None]  # (B, cap)
        return torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], keys, vals, attn_mask=mask[:, None, None], enable_gqa=True)[:, :, 0]

    impls = {"sdpa, rows gathered": sdpa, "OneTokenAttention (eager)": eager, "decode_attention (ours)": ours}
    sub = slice(0, min(B, 4))  # the float64 reference loops over rows and heads: a few rows suffice
    truth = decode_attention_reference(q[sub].double(), k_layer.double(), v_layer.double(), slots[sub], nvis[sub])
    kv_bytes = 2 * int(nvis.sum()) * kvh * d * cache.k.element_size()
    io_bytes = kv_bytes + 2 * q.numel() * q.element_size()
    peak = next((v for k, v in PEAK_TBPS.items() if k in torch.cuda.get_device_name(device)), None) \
        if device.type == "cuda" else None
    rows = []
    for name, fn in impls.items():
        with torch.inference_mode():
            err = (fn()[sub].double() - truth).abs().max().item()
            t = time_fn(fn, device, reps=args.reps)
        gbps = io_bytes / (t["median_ms"] * 1e-3) / 1e9
        rows.append({"impl": name, **t, "GB/s": gbps, "% HBM": None if peak is None else 100 * gbps / (peak * 1e3),
                     "max_err": err})
    print_table(f"decode attention: {B} rows x {H}/{kvh} heads x d{d}, keys {cap // 2}-{cap}, {args.dtype}, "
                f"{device.type}", rows, ["impl", "median_ms", "p20_ms", "p80_ms", "GB/s", "% HBM", "max_err"])
    if not args.no_record:
        record("bench_decode_attention", {k: v for k, v in vars(args).items() if k != "no_record"}, rows, device)


if __name__ == "__main__":
    main()
