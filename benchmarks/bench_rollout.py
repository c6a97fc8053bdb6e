"""Rollout throughput: how much tool latency the agent loop hides behind decoding.

E episodes of T tool calls each run through AgentLoop on a real decoder (real prefill, decode and
KV-cache work) whose *choices* are scripted: the logits are computed, then the scripted token is
forced, so every episode makes exactly T tool calls with turns of varied lengths and then answers.
The tool sleeps a random latency (exponential, mean --latency-ms, seeded) on the runner's loop.

Rows: the same episodes with 0-latency tools (pure decode), then with latency. Two references:
  lockstep bound   decode time + sum over turns of the slowest call in that turn: what a batched
                   loop that waits for every episode's tool call before decoding again would take;
  serial bound     decode time + the sum of all latencies: no concurrency at all.
"hidden" = the fraction of the summed tool latency that did not add to the wall time.

    python benchmarks/bench_rollout.py                      # CPU: 32 episodes x 3 calls, 50 ms mean latency
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import msgspec
import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from common import print_table, record

from sailor_engine.env.runner import ToolLimits, ToolRunner
from sailor_engine.model import ModelConfig, Transformer
from sailor_engine.model.tokenizer import SPECIAL_TOKENS, Tokenizer
from sailor_engine.rollout.agent import AgentLoop
from sailor_engine.rollout.format import ChatTemplate
from sailor_engine.rollout.generator import Generator, SamplingParams


class ScriptedPolicy(torch.nn.Module):
    """Runs the real model, then forces the scripted next token: real compute, known choices.

    The script of an episode is read from its question ("episode <i>"); the turn number is the
    number of tool responses in the context; a chunk longer than one token starts a new turn.
    """

    def __init__(self, model: Transformer, tok: Tokenizer, turns: list[list[str]]):
        super().__init__()
        self.model, self.tok, self.turns = model, tok, turns
        self.embed_tokens = model.embed_tokens
        self.hist: dict[int, list[int]] = {}
        self.turn_start: dict[int, int] = {}
        self.encoded: dict[tuple[int, int], list[int]] = {}
        self._next: list[int] = []

    def new_kv_cache(self, num_slots, max_seq_len, dtype=None):
        return self.model.new_kv_cache(num_slots, max_seq_len, dtype=dtype)

    def forward_cached(self, ids, cu, cache, slots):
        self._next = []
        for i, slot in enumerate(slots.tolist()):
            start, chunk = int(cache.lengths[slot]), ids[cu[i]:cu[i + 1]].tolist()
            h = self.hist.setdefault(slot, [])
            del h[start:]
            h.extend(chunk)
            if len(chunk) > 1:
                self.turn_start[slot] = len(h)
            text = self.tok.decode(h)
            ep = int(text.split("episode ", 1)[1].split("?", 1)[0])
            turn = min(text.count("</tool_response>"), len(self.turns[ep]) - 1)
            key = (ep, turn)
            if key not in self.encoded:
                self.encoded[key] = self.tok.encode(self.turns[ep][turn])
            script = self.encoded[key]
            k = len(h) - self.turn_start[slot]
            self._next.append(script[k] if k < len(script) else self.tok.eos_id)
        return self.model.forward_cached(ids, cu, cache, slots)

    def logits(self, hidden):
        real = self.model.logits(hidden)  # paid for, then overridden
        forced = torch.full_like(real, -30.0)
        forced[torch.arange(len(self._next)), torch.tensor(self._next)] = 30.0
        return forced


class SleepArgs(msgspec.Struct):
    key: str


class SleepTool:
    """Answers after a latency drawn per call (seeded by the key, so every run sees the same latencies)."""

    name, description, args_type, cacheable = "lookup", "Look a key up (slowly).", SleepArgs, False

    def __init__(self, latencies: dict[str, float]):
        self.latencies = latencies

    async def __call__(self, args: SleepArgs) -> str:
        await asyncio.sleep(self.latencies[args.key])
        return f"value of {args.key}"


def tokenizer() -> Tokenizer:
    raw = RawTokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    corpus = ['{"name": "lookup", "arguments": {"key": "e1t2"}}', "episode 12? value of e3t1 think answer",
              "I need to look this up first, then compare the values"] * 20
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=list(SPECIAL_TOKENS),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--calls", type=int, default=3, help="tool calls per episode")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="mean tool latency (exponential)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tok = tokenizer()
    rng = random.Random(args.seed)
    turns, latencies = [], {}
    for e in range(args.episodes):
        script = []
        for t in range(args.calls):
            pad = " ".join(["I need to look this up first"] * rng.randint(0, 3))  # turns of varied length
            script.append(f'<think>{pad}</think><tool_call>{{"name": "lookup", "arguments": {{"key": "e{e}t{t}"}}}}</tool_call>')
            latencies[f"e{e}t{t}"] = rng.expovariate(1000.0 / args.latency_ms)
        script.append("<think>compare the values</think><answer>done</answer>")
        turns.append(script)
    cfg = ModelConfig(family="qwen2", vocab_size=tok.vocab_size, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_layers=args.layers, num_heads=4, num_kv_heads=2, qkv_bias=True)
    model = Transformer(cfg, device=args.device).init_weights(generator=torch.Generator().manual_seed(args.seed)).eval()
    tasks = [msgspec.defstruct("Task", [("id", str), ("question", str)])(f"e{e}", f"What happened in episode {e}?")
             for e in range(args.episodes)]

    def run(scale: float) -> tuple[float, dict, int]:
        policy = ScriptedPolicy(model, tok, turns)
        gen = Generator(policy, max_batch=args.max_batch, max_seq_len=1024)
        tool = SleepTool({k: v * scale for k, v in latencies.items()})
        with ToolRunner([tool], limits=ToolLimits(timeout_s=60, concurrency=1024)) as runner:
            loop = AgentLoop(gen, runner, ChatTemplate(tok), params=SamplingParams(greedy=True, max_new_tokens=96),
                             max_turns=args.calls + 1, system="Answer.")
            t0 = time.perf_counter()
            trajs = loop.run(tasks, group_size=1)
            wall = time.perf_counter() - t0
        assert all(t.status == "answered" and len(t.tool_calls) == args.calls for t in trajs), "script not followed"
        return wall, loop.stats, sum(t.num_generated for t in trajs)

    run(0.0)  # warm-up
    wall0, stats0, tokens = run(0.0)
    wall, stats, _ = run(1.0)
    total_latency = sum(latencies.values())
    lockstep = wall0 + sum(max(latencies[f"e{e}t{t}"] for e in range(args.episodes)) for t in range(args.calls))
    serial = wall0 + total_latency
    rows = [
        {"run": "tools 0 ms (decode only)", "wall_s": wall0, "episodes_per_s": args.episodes / wall0,
         "tokens_per_s": tokens / wall0, "decode_s": stats0["decode_s"], "tool_wait_s": stats0["tool_wait_s"]},
        {"run": f"tools ~{args.latency_ms:.0f} ms (agent loop)", "wall_s": wall, "episodes_per_s": args.episodes / wall,
         "tokens_per_s": tokens / wall, "decode_s": stats["decode_s"], "tool_wait_s": stats["tool_wait_s"],
         "hidden": 1 - (wall - wall0) / total_latency},
        {"run": "lockstep bound", "wall_s": lockstep, "episodes_per_s": args.episodes / lockstep,
         "hidden": 1 - (lockstep - wall0) / total_latency},
        {"run": "serial bound", "wall_s": serial, "episodes_per_s": args.episodes / serial, "hidden": 0.0},
    ]
    print_table(f"rollout: {args.episodes} episodes x {args.calls} tool calls, {args.layers}L h{args.hidden}, "
                f"summed tool latency {total_latency:.2f} s, {args.device}",
                rows, ["run", "wall_s", "episodes_per_s", "tokens_per_s", "decode_s", "tool_wait_s", "hidden"])
    record("bench_rollout", vars(args), rows, args.device)


if __name__ == "__main__":
    main()
