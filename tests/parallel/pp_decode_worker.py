"""torchrun worker (2 ranks, gloo, fp32): pp=2 pipelined greedy decode equals the single-process Generator.

Every rank builds the same tiny model; the reference is `Generator.generate` (greedy, stop token)
on the whole model in one process. The pipeline splits the weights into 2 stages, deals 5 prompts
of different lengths into 1, 2 or 3 groups in flight, and decodes with each stage caching its own
layers; also pp = 1 (one stage on a 1-rank group), and an fp64 model over an fp32 wire. Tokens must be identical (one sequence stops
early on the stop token), log-probs within 2e-5 (std 0.5 weights give logits of tens, whose fp32 ulp
is ~4e-6: the stages run the module path, the Generator its fused one). Prints "pipelined decode matches the generator" on rank 0.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from sailor_engine.model import ModelConfig, Transformer
from sailor_engine.parallel.dims import ParallelDims
from sailor_engine.parallel.pipeline import PipelineStage, pipelined_decode, stage_layers
from sailor_engine.rollout.generator import Generator, SamplingParams

CFGS = {"tied": ModelConfig(family="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=4,
                            num_heads=4, num_kv_heads=2, qkv_bias=True),
        "untied": ModelConfig(family="qwen3", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=3,
                              num_heads=4, num_kv_heads=4, head_dim=8, qk_norm=True, tie_word_embeddings=False)}
PROMPT_LENS = [5, 1, 9, 3, 7]
NEW = 7


def main() -> int:
    dist.init_process_group("gloo")
    groups = ParallelDims(1, 1, 2).build()
    alone = ParallelDims(2, 1, 1).build().pp  # a 1-rank pp group: the pp = 1 path (first stage is the last)
    failures, worst = [], 0.0
    cases = [("tied", CFGS["tied"], torch.float32, None), ("untied", CFGS["untied"], torch.float32, None),
             ("tied fp64, fp32 wire", CFGS["tied"], torch.float64, torch.float32)]
    for tag, cfg, dtype, wire in cases:
        model = Transformer(cfg, dtype=dtype).init_weights(std=0.5, generator=torch.Generator().manual_seed(1)).eval()
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]
        with torch.inference_mode():
            free = Generator(model, max_batch=8, max_seq_len=32).generate(
                prompts, SamplingParams(greedy=True, max_new_tokens=NEW))
        stop = free[0].token_ids[2]  # prompt 0 (at least) stops after 3 tokens
        with torch.inference_mode():
            ref = Generator(model, max_batch=8, max_seq_len=32).generate(
                prompts, SamplingParams(greedy=True, max_new_tokens=NEW, stop_token_ids=(stop,)))
        assert len(ref[0].token_ids) <= 3 and any(len(c.token_ids) == NEW for c in ref), [c.token_ids for c in ref]
        stage = PipelineStage(model, stage_layers(cfg, 2)[groups.pp_rank], groups.pp_rank, 2)
        whole = PipelineStage(model, range(cfg.num_layers), 0, 1)
        for k, st, pg in ((1, stage, groups.pp), (2, stage, groups.pp), (3, stage, groups.pp), (2, whole, alone)):
            out = pipelined_decode(st, prompts if st.is_first else None, pg, max_new_tokens=NEW,
                                   num_groups=k, stop_token_ids=(stop,), act_dtype=wire)
            if not st.is_first:
                assert out is None
                continue
            for i, ((ids, lps), c) in enumerate(zip(out, ref)):
                err = max((abs(a - b) for a, b in zip(lps, c.logprobs)), default=0.0)
                worst = max(worst, err)
                if ids != c.token_ids or not err <= 2e-5:
                    failures.append(f"{tag} pp={st.pp} groups={k} prompt {i}: {ids} vs {c.token_ids}, "
                                    f"logp err {err:.1e}")
    flag = torch.tensor([len(failures)])
    dist.all_reduce(flag)
    for f in failures:
        print("MISMATCH", f)
    if dist.get_rank() == 0 and int(flag) == 0:
        print(f"pipelined decode matches the generator (max logp err {worst:.1e})")
    dist.destroy_process_group()
    return 1 if int(flag) else 0


if __name__ == "__main__":
    sys.exit(main())
