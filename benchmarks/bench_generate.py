"""Generation throughput: the engine's Generator vs transformers' generate on the same tiny model.

Both greedy, same random weights, same prompts (mixed lengths). transformers runs the whole batch
with left padding (its fastest batched mode); ours runs continuous batching over the KV cache. The
greedy outputs are compared token for token and the table says whether they agree.

    python benchmarks/bench_generate.py                       # CPU default: demo-sized model
    python benchmarks/bench_generate.py --device cuda --hidden 1024 --layers 16 --batch 64
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import print_table, record

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
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=max(1, args.heads // 2), tie_word_embeddings=True,
                                   max_position_embeddings=1024)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # sharper than the 0.02 init, so greedy paths are not ties
        for p in hf.parameters():
            p.mul_(6.0 if p.ndim > 1 else 1.0)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_hf(d, device=args.device).eval()
    hf = hf.to(args.device)
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(16, 96, (args.batch,), generator=g).tolist()
    prompts = [torch.randint(1, args.vocab, (n,), generator=g).tolist() for n in lens]
    n_new = args.new_tokens

    T = max(lens)
    ids = torch.zeros(args.batch, T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(args.device), mask.to(args.device)

    def run_hf():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
        return [row[T:].tolist() for row in out]

    gen = Generator(ours, max_batch=args.batch, max_seq_len=T + n_new + 1)

    def run_ours():
        return [c.token_ids for c in gen.generate(prompts, SamplingParams(greedy=True, max_new_tokens=n_new))]

    rows, outputs = [], {}
    for name, fn in (("transformers.generate", run_hf), ("sailor Generator", run_ours)):
        with torch.inference_mode():
            outputs[name] = fn()  # warm-up, and the outputs to compare
            times = []
            for _ in range(args.reps):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        med = sorted(times)[len(times) // 2]
        rows.append({"impl": name, "median_s": med, "tokens_per_s": args.batch * n_new / med})
    same = sum(a == b for a, b in zip(outputs["transformers.generate"], outputs["sailor Generator"]))
    rows[1]["speedup"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    rows[1]["greedy_identical"] = f"{same}/{args.batch}"
    print_table(f"generate: {args.batch} prompts ({min(lens)}-{max(lens)} tokens) x {n_new} new tokens, "
                f"{args.layers}L h{args.hidden} V{args.vocab}, {args.device}",
                rows, ["impl", "median_s", "tokens_per_s", "speedup", "greedy_identical"])
    record("bench_generate", vars(args), rows, args.device)


if __name__ == "__main__":
    main()
