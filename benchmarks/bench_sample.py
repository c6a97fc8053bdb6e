"""Benchmark the generator's CPU sampling step: the C kernel (csrc/cpu_sample.c) vs the torch ops it replaces.

    python benchmarks/bench_sample.py                                   # R 32 / 128 x V 4096 / 32768 / 151936
    python benchmarks/bench_sample.py --rows 64 --vocab 151936 --threads 2

One step: (R, V) fp32 logits -> a token and its log-prob per row, greedy (argmax, log p = z_t -
logsumexp z) or sampled at temperature T (inverse CDF over softmax(z / T), no truncation: the RL
rollouts' setting). The torch side is the Generator's own torch path (`generator.sample_torch`).
Both are checked first: tokens against float64
(greedy: equal; sampled: equal to a float64 inverse CDF at the same u wherever u * total is not within
1e-6 of a CDF step), log-probs as the largest |error| against float64. Results: the table and one JSON
line in benchmarks/results/bench_sample.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, record, time_fn  # noqa: E402

from sailor_engine.kernels import cpu_sample  # noqa: E402
from sailor_engine.rollout.generator import SamplingParams, sample_torch  # noqa: E402


def torch_step(z: torch.Tensor, T: float | None, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Generator's torch path (generator.sample_torch) for an all-greedy (T None) or all-sampled batch."""
    params = SamplingParams(greedy=True) if T is None else SamplingParams(temperature=T)
    return sample_torch(z, [params] * z.shape[0], None if T is None else u)


def check(z: torch.Tensor, T: float | None, u: torch.Tensor, tokens: torch.Tensor, logps: torch.Tensor) -> tuple[str, float]:
    """(tokens: 'R/R equal' or 'k of R differ', max |log-prob error|) against float64."""
    ref = torch.log_softmax(z.double() / (T or 1.0), -1)
    if T is None:
        want, near = ref.argmax(-1), torch.zeros(len(z), dtype=torch.bool)
    else:
        cdf = ref.exp().cumsum(-1)
        target = u.double() * cdf[:, -1]
        want = torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_(max=z.shape[1] - 1)
        near = (cdf - target[:, None]).abs().min(-1).values < 1e-6 * cdf[:, -1]
    differ = int(((tokens != want) & ~near).sum())
    err = (logps.double() - ref.gather(-1, tokens[:, None])[:, 0]).abs().max().item()
    return (f"{len(z) - differ}/{len(z)}" + (f" ({int(near.sum())} at a step)" if near.any() else "")), err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--vocab", type=int, nargs="+", default=[4096, 32768, 151936])
    ap.add_argument("--temperature", type=float, default=1.0, help="of the sampled rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/results")
    args = ap.parse_args()
    if not cpu_sample.available():
        sys.exit(f"bench_sample: the C kernel is not built here: {cpu_sample.status()}")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for V in args.vocab:
        for R in args.rows:
            z = torch.randn(R, V, generator=g) * 4  # logits of a trained LM's spread: a few dominant tokens
            u = torch.rand(R, generator=g)
            for mode, T in (("greedy", None), (f"T={args.temperature:g}", args.temperature)):
                temp = torch.full((R,), 0.0 if T is None else T)
                impls = (("torch ops", lambda: torch_step(z, T, u)), ("C (cpu_sample)", lambda: cpu_sample.sample(z, temp, u)))
                for name, fn in impls:
                    tokens, logps = fn()
                    agree, err = check(z, T, u, tokens, logps)
                    t = time_fn(fn, "cpu", reps=args.reps)
                    rows.append({"impl": name, "rows": R, "vocab": V, "mode": mode, "median_ms": t["median_ms"],
                                 "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"], "tokens_vs_fp64": agree,
                                 "max_logp_err": err})
                rows[-1]["speedup"] = rows[-2]["median_ms"] / rows[-1]["median_ms"]
    print_table(f"sampling step: (R, V) fp32 logits -> token + log-prob per row, {args.threads} thread(s)", rows,
                ["impl", "rows", "vocab", "mode", "median_ms", "p20_ms", "p80_ms", "speedup", "tokens_vs_fp64",
                 "max_logp_err"])
    if not args.no_record:
        record("bench_sample", {k: v for k, v in vars(args).items() if k != "no_record"}, rows, "cpu")


if __name__ == "__main__":
    main()
