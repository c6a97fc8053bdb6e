"""Generation throughput: the engine's Generator vs transformers' generate on the same tiny model.

Same random weights, same prompts (mixed lengths). transformers runs the whole batch with left
padding (its fastest batched mode); ours runs continuous batching over the KV cache. Greedy outputs
are compared token for token and the table says whether they agree; `--mode sample` times
temperature-1 sampling (the RL rollouts' setting), where outputs cannot be compared.

    python benchmarks/bench_generate.py                       # CPU default: demo-sized model, 1 thread
    python benchmarks/bench_generate.py --batch 128 --mode sample
    python benchmarks/bench_generate.py --prompt-len 600 1000 --new-tokens 64   # rollout-length rows
    python benchmarks/bench_generate.py --device cuda --hidden 1024 --layers 16 --batch 64   # + ours without CUDA graphs

Timing on a shared machine: the two implementations alternate, rep by rep, so a change in load
hits both; each row reports the median wall time (p20 / p80 beside it) and the median process CPU
time, which counts only the time this process ran and so moves far less with the load. The load
average before and after is recorded with the run. `--threads` sets torch's intra-op threads for
both (default 1: with 2 busy cores, a second thread turns every small op into a wait for a
descheduled worker, 5-10x slower for both implementations).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from common import print_table, quantiles, record

from sailor_engine.model import load_hf
from sailor_engine.rollout.generator import Generator, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(16, 96), metavar=("MIN", "MAX"),
                    help="prompt lengths drawn from [MIN, MAX) (the RL rollouts' rows run to ~1-2k tokens)")
    ap.add_argument("--mode", choices=("greedy", "sample"), default="greedy",
                    help="greedy (outputs compared) or temperature-1 sampling, no top-p / top-k")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both (0: torch's default)")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=max(1, args.heads // 2), tie_word_embeddings=True,
                                   max_position_embeddings=max(1024, args.prompt_len[1] + args.new_tokens))
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # sharper than the 0.02 init, so greedy paths are not ties
        for p in hf.parameters():
            p.mul_(6.0 if p.ndim > 1 else 1.0)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_hf(d, device=args.device).eval()
    hf = hf.to(args.device)
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(*args.prompt_len, (args.batch,), generator=g).tolist()
    prompts = [torch.randint(1, args.vocab, (n,), generator=g).tolist() for n in lens]
    n_new = args.new_tokens
    greedy = args.mode == "greedy"

    T = max(lens)
    ids = torch.zeros(args.batch, T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(args.device), mask.to(args.device)
    hf_sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}

    def run_hf():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0,
                          eos_token_id=None, **hf_sampling)
        return [row[T:].tolist() for row in out]

    gen = Generator(ours, max_batch=args.batch, max_seq_len=T + n_new + 1)
    params = SamplingParams(greedy=True, max_new_tokens=n_new) if greedy else \
        SamplingParams(temperature=1.0, max_new_tokens=n_new, seed=0)

    def run_ours():
        return [c.token_ids for c in gen.generate(prompts, params)]

    impls = {"transformers.generate": run_hf, "sailor Generator": run_ours}
    if args.device.startswith("cuda"):  # what the decode step's CUDA graphs bring, in the same run
        eager = Generator(ours, max_batch=args.batch, max_seq_len=T + n_new + 1, decode_graphs=False)
        impls["sailor Generator, no CUDA graphs"] = lambda: [c.token_ids for c in eager.generate(prompts, params)]
    load_before = os.getloadavg()
    outputs, wall, cpu = {}, {n: [] for n in impls}, {n: [] for n in impls}
    with torch.inference_mode():
        for name, fn in impls.items():
            outputs[name] = fn()  # warm-up, and the outputs to compare
        for _ in range(args.reps):  # interleaved: a load change hits both implementations
            for name, fn in impls.items():
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                wall[name].append((time.perf_counter() - w0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
    load_after = os.getloadavg()
    rows = []
    for name in impls:
        q = quantiles(wall[name])
        rows.append({"impl": name, "median_s": q["median_ms"] / 1e3, "p20_s": q["p20_ms"] / 1e3,
                     "p80_s": q["p80_ms"] / 1e3, "cpu_s": statistics.median(cpu[name]) / 1e3,
                     "tokens_per_s": args.batch * n_new / (q["median_ms"] / 1e3)})
    base = rows[0]
    for mine in rows[1:]:
        mine["speedup"] = mine["tokens_per_s"] / base["tokens_per_s"]
        mine["cpu_speedup"] = base["cpu_s"] / mine["cpu_s"]
        if greedy:
            same = sum(a == b for a, b in zip(outputs["transformers.generate"], outputs[mine["impl"]]))
            mine["greedy_identical"] = f"{same}/{args.batch}"
    path = _cpu_path(args.device)
    print_table(f"generate ({args.mode}): {args.batch} prompts ({min(lens)}-{max(lens)} tokens) x {n_new} new tokens, "
                f"{args.layers}L h{args.hidden} V{args.vocab}, {args.device}, {torch.get_num_threads()} thread(s), "
                f"forward: {path}, "
                f"load {load_before[0]:.1f} -> {load_after[0]:.1f}",
                rows, ["impl", "median_s", "p20_s", "p80_s", "cpu_s", "tokens_per_s", "speedup", "cpu_speedup",
                       "greedy_identical"])
    if not args.no_record:
        config = {k: v for k, v in vars(args).items() if k != "no_record"}
        config.update(threads=torch.get_num_threads(), loadavg_before=[round(x, 2) for x in load_before],
                      loadavg_after=[round(x, 2) for x in load_after])
        if args.device == "cpu":
            config["cpu_path"] = path
        record("bench_generate", config, rows, args.device)


def _cpu_path(device: str) -> str:
    """Which KV-cache forward ours runs: the C decoder (layers and attention in one call), the C attention
    under torch layers, or torch ops throughout (SAILOR_ENGINE_NATIVE=0 forces that), and why."""
    if device != "cpu":
        return "torch, decode steps from CUDA graphs"
    from sailor_engine.kernels import cpu_attention, cpu_decoder

    if cpu_decoder.available():
        return "C decoder"
    if cpu_attention.available():
        return f"C attention, torch layers ({cpu_decoder.status()})"
    return f"torch ({cpu_attention.status()})"


if __name__ == "__main__":
    main()
