"""A short pass through every stage the engine has today, on the embedded synthetic world, on the CPU.

    sailor-engine demo                  # ~2 minutes on 2 cores

synth (graph -> verified QA, offline web, tokenizer, expert trajectories) -> a tiny decoder ->
a few RFT steps on expert trajectories (packed varlen, fused log-prob, tool responses masked) ->
ReAct rollouts on held-out tasks (in-process generator on the same module, real search / visit on
the uvloop tool runner) -> rewards -> GRPO advantages -> DUPO batch -> one policy-gradient update
through the fused policy loss. Each stage prints what it did. The steps are far too few to learn
the task; the full trainer (schedules, checkpoints, eval with confidence intervals, plots) is the
trainer issue's, and `sailor-engine demo` becomes that run when it lands.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import msgspec
import torch
from rich.console import Console
from rich.table import Table

from sailor_engine.config import Config, load_config
from sailor_engine.env.runner import ToolLimits, ToolRunner
from sailor_engine.env.tools import SearchTool, VisitTool
from sailor_engine.kernels.logprob import fused_linear_logprob
from sailor_engine.model import Tokenizer, Transformer
from sailor_engine.rl.dupo import build_batch
from sailor_engine.rl.loss import global_norm, rl_loss
from sailor_engine.rl.rewards import score_batch
from sailor_engine.rollout.agent import AgentLoop, Trajectory
from sailor_engine.rollout.format import ChatTemplate
from sailor_engine.rollout.generator import Generator, SamplingParams
from sailor_engine.synth.pipeline import synthesize
from sailor_engine.train.batching import Sequence, pack, split_by_tokens

# The embedded world and model: small enough for a laptop CPU in minutes (see examples/tiny.yaml).
DEMO_OVERRIDES = (
    "synth.num_entities=400", "synth.num_questions=600", "synth.max_hops=2", "synth.level_mix=[0.5,0.5,0.0]",
    "synth.vocab_size=2048", "synth.expert_max_tokens=2048",
    "model.family=qwen2", "model.qkv_bias=true", "model.hidden_size=128", "model.intermediate_size=352",
    "model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=2", "model.max_position_embeddings=2048",
    "rollout.max_new_tokens=64", "rollout.max_turns=4", "rollout.max_context=2048",
    # Groups whose episodes differ in format but not in correctness still carry a signal (the
    # paper's text: "reward std"); with only a few RFT steps nothing is correct yet.
    "algo.group_size=4", "algo.zero_variance=reward_std", "train.micro_batch_tokens=8192", "train.rft.lr=3e-3", "train.rl.lr=1e-4",
)


@dataclass
class PreviewResult:
    rft_loss: list[float]
    rollouts: list[Trajectory]
    rewards: torch.Tensor
    rl_loss: float | None
    skip_reason: str | None


def demo_config(path: str | None = None, overrides: tuple[str, ...] = ()) -> Config:
    return load_config(path, (() if path else DEMO_OVERRIDES) + tuple(overrides))


def run_preview(cfg: Config, *, rft_steps: int = 200, rl_tasks: int = 8, console: Console | None = None) -> PreviewResult:
    con = console or Console()
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()

    con.rule("1. synthesis")
    world = synthesize(cfg.synth)
    tok = Tokenizer(world.tokenizer)
    con.print(f"{len(world.graph.names)} entities, {len(world.train)} train / {len(world.test)} held-out tasks, "
              f"{len(world.pages)} pages, {len(world.experts)} expert trajectories, vocab {tok.vocab_size}")

    con.rule("2. model")
    vocab = math.ceil(tok.vocab_size / 64) * 64
    mcfg = msgspec.structs.replace(cfg.model, vocab_size=vocab)
    model = Transformer(mcfg).init_weights(generator=torch.Generator().manual_seed(cfg.train.seed))
    con.print(f"{mcfg.family} decoder: {mcfg.num_layers} layers, width {mcfg.hidden_size}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, tied embeddings={mcfg.tie_word_embeddings}")

    con.rule("3. RFT on expert trajectories (tool responses masked)")
    tpl = ChatTemplate(tok)
    data = [Sequence(*tpl.render_messages([msgspec.to_builtins(m) for m in t.messages])) for t in world.experts]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.rft.lr, weight_decay=cfg.train.rft.weight_decay)
    g = torch.Generator().manual_seed(cfg.train.seed)
    losses = []
    for step in range(rft_steps):
        batch = [data[i] for i in torch.randint(len(data), (min(8, len(data)),), generator=g).tolist()]
        opt.zero_grad(set_to_none=True)
        total = sum(sum(s.loss_mask[1:]) for s in batch)
        loss_sum = 0.0
        for mb in split_by_tokens(batch, cfg.train.micro_batch_tokens):
            p = pack(mb)
            hidden = model.forward_packed(p.input_ids, p.cu_seqlens)
            logp = fused_linear_logprob(hidden, model.output_weight, p.targets)
            loss = -(logp * p.loss_mask).sum() / total  # global token mean over the whole step
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        losses.append(loss_sum)
        if step % 10 == 0 or step == rft_steps - 1:
            con.print(f"step {step:3d}  loss {loss_sum:.3f}  ({time.perf_counter() - t0:.0f}s)")

    con.rule("4. rollouts on held-out tasks")
    G = cfg.algo.group_size
    tasks = world.test[:rl_tasks]
    gen = Generator(model, max_batch=min(64, G * len(tasks)), max_seq_len=cfg.rollout.max_context or 2048)
    params = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                            max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.train.seed)
    model.eval()
    with ToolRunner([SearchTool(world.web), VisitTool(world.web)],
                    limits=ToolLimits(timeout_s=cfg.rollout.tool_timeout_s)) as runner:
        system = msgspec.to_builtins(world.experts[0].messages[0])["content"] if world.experts else None
        loop = AgentLoop(gen, runner, tpl, params=params, max_turns=cfg.rollout.max_turns, system=system)
        trajs = loop.run(tasks, group_size=G)
    model.train()
    answers = [[t.answer, *t.aliases] for t in tasks for _ in range(G)]
    scored = score_batch([t.response for t in trajs], answers, cfg.algo)
    _rollout_table(con, trajs, scored, loop.stats)

    con.rule("5. DUPO update")
    rewards = scored.rewards.view(len(tasks), G)
    correct = scored.correct.view(len(tasks), G)
    truncated = torch.tensor([t.status in ("max_turns", "max_context") for t in trajs]).view(len(tasks), G)
    batch = build_batch(rewards, correct, truncated, cfg.algo, torch.Generator().manual_seed(cfg.train.seed))
    con.print(f"DUPO: {batch.stats}")
    if batch.skip_reason is not None:
        con.print(f"[yellow]no update: {batch.skip_reason}[/yellow]  (an untrained policy rarely solves anything)")
        return PreviewResult(losses, trajs, scored.rewards, None, batch.skip_reason)
    rl_seqs, advs = [], []
    for slot, grp in enumerate(batch.index.tolist()):
        for j in range(G):
            t = trajs[grp * G + j]
            keep = bool(batch.seq_keep[slot, j])
            rl_seqs.append(Sequence(t.token_ids, t.loss_mask if keep else [0] * len(t.loss_mask), t.logprobs))
            advs.append(float(batch.advantages[slot, j]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.rl.lr, weight_decay=cfg.train.rl.weight_decay)
    mbs = split_by_tokens(rl_seqs, cfg.train.micro_batch_tokens)
    packed = [pack(mb) for mb in mbs]
    norm = global_norm([p.loss_mask for p in packed], [p.seq_ids for p in packed])
    opt.zero_grad(set_to_none=True)
    total, first, mismatch, clip_high, n_tok = 0.0, 0, 0.0, 0.0, 0
    for p, mb in zip(packed, mbs):
        hidden = model.forward_packed(p.input_ids, p.cu_seqlens)
        logp = fused_linear_logprob(hidden, model.output_weight, p.targets, temperature=params.temperature)
        adv = torch.tensor(advs[first:first + len(mb)])
        first += len(mb)
        loss, stats = rl_loss(logp, p.old_logp, adv, p.loss_mask, norm, cfg.algo, seq_ids=p.seq_ids)
        loss.backward()
        total += loss.item()
        mismatch = max(mismatch, ((logp.detach() - p.old_logp).abs() * p.loss_mask).max().item())
        clip_high += float(stats["clip_frac_high"]) * int(stats["num_tokens"])
        n_tok += int(stats["num_tokens"])
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    opt.step()
    con.print(f"policy loss {total:.4f}; clip fraction high {clip_high / max(n_tok, 1):.3f}; "
              f"max |sampling - training log-prob| {mismatch:.2e}")
    con.print(f"done in {time.perf_counter() - t0:.0f}s")
    return PreviewResult(losses, trajs, scored.rewards, total, None)


def _rollout_table(con: Console, trajs: list[Trajectory], scored, loop_stats: dict) -> None:
    n = len(trajs)
    status = [t.status for t in trajs]
    calls = [c for t in trajs for c in t.tool_calls]
    rows = {
        "episodes": n,
        "answered / turn limit / context limit": f"{status.count('answered')} / {status.count('max_turns')} / "
                                                 f"{status.count('max_context')}",
        "mean turns": f"{sum(t.turns for t in trajs) / n:.1f}",
        "tool calls (failed)": f"{len(calls)} ({sum(not c.ok for c in calls)})",
        "format errors (malformed turns)": sum(t.format_errors for t in trajs),
        "well-formed / correct": f"{int(scored.format_ok.sum())} / {int(scored.correct.sum())}",
        "mean reward": f"{scored.rewards.mean():.3f}",
        "decoding / waiting on tools, s": f"{loop_stats['decode_s']:.1f} / {loop_stats['tool_wait_s']:.1f}",
    }
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for k, v in rows.items():
        table.add_row(k, str(v))
    con.print(table)
