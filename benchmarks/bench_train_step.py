"""Benchmark one RL update of the trainer: tokens/s, ms per update, peak memory, and model FLOP utilisation.

    python benchmarks/bench_train_step.py --threads 1                        # CPU: examples/tiny.yaml's model
    python benchmarks/bench_train_step.py --config 1.5b --device cuda        # GPU: a Qwen2-1.5B-shaped model, bf16

One update is what train/rl.py's run_update + optimizer step do, on synthetic trajectories: random
token ids with tool-response spans masked out of the loss, per-sequence advantages and old
log-probs; the mini-batch packed first-fit-decreasing into micro-batches of --micro-batch-tokens
(train.batching, as the trainer packs), the loss normalised over the whole mini-batch
(rl.loss.global_norm), then per micro-batch Transformer.forward_packed -> log-probs -> rl_loss ->
backward, then grad-norm clipping and AdamW. The log-prob implementations side by side: `fused`
(sailor_engine.kernels.fused_linear_logprob, the trainer's) and `naive` (full logits ->
log_softmax -> gather), each on its own model built from the same seed and checked against the
other's loss before it is timed. old_logp is the model's own log-probs plus N(0, 0.1) noise: the
ratio spread of a later mini-batch update, so clipping binds on some tokens as it does in training.

FLOPs are model FLOPs: 6 x (matmul parameters, the LM head included) x tokens + causal attention
6 x layers x (heads x head_dim) x sum(seq_len^2); our log-prob kernel's recompute is not counted.
MFU divides the achieved model FLOP/s by a matmul ceiling measured in the same process and dtype
(one square torch.matmul, --ceiling-n: 8192 on CUDA, 1024 on CPU), not by a datasheet number.
Peak memory is what one update allocates above the model and optimizer state (activations,
gradients, transients; common.peak_memory_mb). On CUDA --dtype bf16 holds parameters and AdamW
state in bf16 (pure bf16): the matmul work of the trainer's planned bf16 autocast with fp32
master weights, without its extra fp32 copies.
Results: printed table + one JSON line appended to benchmarks/results/bench_train_step.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_memory_mb, print_table, record, time_fn  # noqa: E402

from sailor_engine.config import load_config  # noqa: E402
from sailor_engine.kernels.logprob import fused_linear_logprob  # noqa: E402
from sailor_engine.model import Transformer  # noqa: E402
from sailor_engine.model.attention import model_backend  # noqa: E402
from sailor_engine.model.config import ModelConfig  # noqa: E402
from sailor_engine.rl.config import AlgoConfig  # noqa: E402
from sailor_engine.rl.loss import global_norm, rl_loss  # noqa: E402
from sailor_engine.train.batching import PackedBatch, Sequence, ffd_split, pack  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Qwen2-1.5B's shape (Qwen2.5-1.5B is the same): tied embeddings, GQA 12 / 2, q/k/v biases.
QWEN2_1_5B = ModelConfig(family="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                         num_heads=12, num_kv_heads=2, rope_theta=1e6, qkv_bias=True, tie_word_embeddings=True,
                         max_position_embeddings=32768)
# per config: (tokens per update, mean trajectory length, micro-batch token budget)
SIZES = {"tiny": (16384, 1024, 8192), "1.5b": (65536, 4096, 16384)}


def model_config(name: str) -> ModelConfig:
    if name == "tiny":
        return load_config(ROOT / "examples" / "tiny.yaml").model  # the demo's model, one source of truth
    return QWEN2_1_5B


# -- synthetic mini-batch ----------------------------------------------------------------------


def trajectories(num_tokens: int, mean_len: int, vocab: int, gen: torch.Generator) -> list[Sequence]:
    """Sequences of ~mean_len tokens (uniform in [mean/2, 3 mean/2]) holding num_tokens positions in all.

    Loss mask: the prompt (first 10%) is 0, then policy spans (mask 1, ~mean/16 tokens) alternate
    with tool-response spans (mask 0, ~mean/8 tokens), as in a ReAct trajectory.
    """
    seqs, left = [], num_tokens
    while left > 0:
        n = int(torch.randint(mean_len // 2, mean_len * 3 // 2 + 1, (1,), generator=gen))
        n = left if left - n < 16 else n  # no sliver at the end: the positions add up exactly
        ids = torch.randint(0, vocab, (n + 1,), generator=gen).tolist()
        mask, pos, policy = [0] * (n + 1), max(1, (n + 1) // 10), True
        while pos < n + 1:
            span = int(torch.randint(1, max(2, mean_len // (8 if policy else 4)), (1,), generator=gen))
            if policy:
                mask[pos:pos + span] = [1] * len(mask[pos:pos + span])
            pos, policy = pos + span, not policy
        seqs.append(Sequence(ids, mask))
        left -= n
    return seqs


class MiniBatch:
    """Packed micro-batches on the device with per-sequence advantages; old_logp set by `attach_old_logp`."""

    def __init__(self, seqs: list[Sequence], budget: int, device: torch.device, gen: torch.Generator):
        self.packed: list[PackedBatch] = [pack(mb).to(device) for mb in ffd_split(seqs, budget)]
        self.adv = [torch.randn(len(p.cu_seqlens) - 1, generator=gen).to(device) for p in self.packed]
        self.max_len = [int((p.cu_seqlens[1:] - p.cu_seqlens[:-1]).max()) for p in self.packed]
        self.old: list[torch.Tensor] = []
        self.positions = sum(p.num_tokens for p in self.packed)
        self.loss_tokens = int(sum(p.loss_mask.sum() for p in self.packed))
        self.sum_sq = sum(int(((p.cu_seqlens[1:] - p.cu_seqlens[:-1]) ** 2).sum()) for p in self.packed)

    @torch.no_grad()
    def attach_old_logp(self, model: Transformer, gen: torch.Generator) -> None:
        for p, m in zip(self.packed, self.max_len):
            logp = fused_linear_logprob(model.forward_packed(p.input_ids, p.cu_seqlens, max_seqlen=m),
                                        model.output_weight, p.targets)
            noise = torch.randn(logp.shape, generator=gen).to(logp.device) * 0.1
            self.old.append((logp + noise).clamp(max=0.0))


# -- one update --------------------------------------------------------------------------------


def naive_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Full (N, V) logits -> fp32 log_softmax -> gather: what a trainer without the kernel computes."""
    logits = hidden @ weight.T
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]


LOGPROB = {"fused": lambda h, w, t: fused_linear_logprob(h, w, t), "naive": naive_logprob}


class Update:
    """One optimizer step of the policy loss over a mini-batch, as train/rl.py runs it (single process)."""

    def __init__(self, model: Transformer, batch: MiniBatch, logprob, algo: AlgoConfig):
        self.model, self.batch, self.logprob, self.algo = model, batch, logprob, algo
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.1)  # as build_optimizer
        self.last = None  # (loss, clip_frac_high) of the last update

    def losses(self):
        """The micro-batch losses at the current parameters (with graphs), and the clip-high count."""
        b = self.batch
        norm = global_norm([p.loss_mask for p in b.packed], [p.seq_ids for p in b.packed])
        for p, adv, old, m in zip(b.packed, b.adv, b.old, b.max_len):
            hidden = self.model.forward_packed(p.input_ids, p.cu_seqlens, max_seqlen=m)
            logp = self.logprob(hidden, self.model.output_weight, p.targets)
            yield rl_loss(logp, old, adv, p.loss_mask, norm, self.algo, seq_ids=p.seq_ids)

    def __call__(self) -> None:
        loss, high = 0.0, 0.0
        for part, st in self.losses():
            part.backward()
            loss += part.detach()
            high += st["clip_frac_high"] * st["num_tokens"]
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.last = (loss, high)


def matmul_params(model: Transformer) -> int:
    """Parameters that take part in a matmul per token: every weight matrix but the embedding lookup, + the LM head."""
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and name != "embed_tokens.weight")
    return n + (model.output_weight.numel() if model.lm_head is None else 0)


def matmul_ceiling(n: int, dtype: torch.dtype, device: torch.device, reps: int) -> float:
    """TFLOP/s of one square (n x n) @ (n x n) torch.matmul in dtype: the ceiling MFU is measured against."""
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    t = time_fn(lambda: a @ b, device, warmup=2, reps=reps)
    return 2 * n**3 / (t["median_ms"] * 1e9)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(SIZES), default="tiny", help="tiny: examples/tiny.yaml's model; "
                   "1.5b: Qwen2-1.5B-shaped")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--tokens", type=int, default=None, help="positions per update (default: tiny 16384, 1.5b 65536)")
    p.add_argument("--seq-len", type=int, default=None, help="mean trajectory length (default: tiny 1024, 1.5b 4096)")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="packing budget (default: tiny 8192, "
                   "1.5b 16384)")
    p.add_argument("--impls", default="fused,naive", help=f"comma-separated, of {sorted(LOGPROB)}")
    p.add_argument("--reps", type=int, default=None, help="timed updates (default 5 on CPU, 10 on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed updates (default 1 on CPU, 2 on GPU)")
    p.add_argument("--ceiling-n", type=int, default=None,
                   help="matmul size of the ceiling (default: 8192 CUDA, 1024 CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens, seq_len, budget = (a or d for a, d in zip((args.tokens, args.seq_len, args.micro_batch_tokens),
                                                       SIZES[args.config]))
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    unknown = set(impls) - set(LOGPROB)
    if unknown or not impls:
        what = f"unknown {sorted(unknown)}" if unknown else "none given"
        p.error(f"--impls: {what}; choose from {sorted(LOGPROB)}")
    reps = args.reps or (10 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    mcfg = model_config(args.config)
    if budget < int(seq_len * 1.5) + 1:
        p.error(f"--micro-batch-tokens {budget} must hold the longest trajectory ({int(seq_len * 1.5)} tokens)")

    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    gen = torch.Generator().manual_seed(0)
    batch = MiniBatch(trajectories(tokens, seq_len, mcfg.vocab_size, gen), budget, device, gen)
    algo = AlgoConfig()  # dupo: clip-higher 0.2 / 0.28, token-mean

    def build() -> Transformer:
        model = Transformer(mcfg, device=device, dtype=dtype).init_weights(generator=torch.Generator().manual_seed(0))
        model.reset_buffers(device)
        return model

    rows, ref_loss = [], None
    for name in impls:
        model = build()
        if not batch.old:
            batch.attach_old_logp(model, gen)
        upd = Update(model, batch, LOGPROB[name], algo)
        with torch.no_grad():
            loss0 = float(sum(part for part, _ in upd.losses()))
        ref_loss = loss0 if ref_loss is None else ref_loss
        t = time_fn(upd, device, warmup=warmup, reps=reps)
        peak = peak_memory_mb(upd, device)
        rows.append({"impl": name, **t, "tokens_per_s": batch.positions / (t["median_ms"] / 1e3), "peak_mb": peak,
                     "loss_at_init": loss0, "loss_diff_vs_first": abs(loss0 - ref_loss),
                     "clip_frac_high": float(upd.last[1]) / batch.loss_tokens})
        n_matmul, params = matmul_params(model), sum(q.numel() for q in model.parameters())
        del upd, model
        if cuda:
            torch.cuda.empty_cache()

    flops = 6 * n_matmul * batch.positions + 6 * mcfg.num_layers * mcfg.num_heads * mcfg.dim_per_head * batch.sum_sq
    ceiling = matmul_ceiling(args.ceiling_n or (8192 if cuda else 1024), dtype, device, reps=20 if cuda else 5)
    for r in rows:
        r["tflop_s"] = flops / (r["median_ms"] * 1e9)
        r["mfu_pct"] = 100 * r["tflop_s"] / ceiling
    config = {"model": args.config, "dtype": {v: k for k, v in DTYPES.items()}[dtype], "tokens": batch.positions,
              "loss_tokens": batch.loss_tokens, "sequences": sum(len(p.cu_seqlens) - 1 for p in batch.packed),
              "micro_batches": len(batch.packed), "micro_batch_tokens": budget, "mean_seq_len": seq_len,
              "matmul_params": n_matmul, "params": params, "model_flops_per_update": flops,
              "matmul_ceiling_tflop_s": ceiling, "ceiling_n": args.ceiling_n or (8192 if cuda else 1024),
              "reps": reps, "warmup": warmup, "threads": torch.get_num_threads(), "algo": "dupo (token-mean, 0.2/0.28)",
              "attn_backend": model_backend(mcfg, device, dtype),
              "load_avg_1m": load}  # CPU timings on a shared machine scale with it
    title = (f"RL update  {args.config} ({n_matmul / 1e6:.1f}M matmul params) {config['dtype']}  "
             f"{batch.positions} tokens in {len(batch.packed)} micro-batches on {device}, attention "
             f"{config['attn_backend']}  "
             f"(matmul ceiling {ceiling:.3g} TFLOP/s)")
    cols = ["impl", "median_ms", "p20_ms", "p80_ms", "tokens_per_s", "tflop_s", "mfu_pct", "peak_mb",
            "clip_frac_high", "loss_diff_vs_first"]
    print_table(title, rows, cols)
    if not args.no_record:
        record("bench_train_step", config, rows, device)


if __name__ == "__main__":
    main()
