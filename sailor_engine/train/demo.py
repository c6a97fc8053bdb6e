"""`sailor-engine demo`: the whole WebSailor pipeline on the embedded synthetic world, on the CPU.

    sailor-engine demo                          # 10.5-14.5 minutes on 2 cores (README); writes runs/demo
    sailor-engine demo --set train.rl.steps=4   # any field of the config

1. synth: knowledge graph -> verified, obfuscated 1- and 2-hop questions -> offline web (pages + BM25
   index) -> tokenizer -> expert ReAct trajectories for 75% of the training questions (split by
   answer entity: the RL pool's answers are ones RFT never saw; held-out answers neither).
2. eval of the untrained model (greedy pass@1): the floor.
3. copy drills (train/drills.py, train.drill): the in-context copying a pretrained LLM brings to the
   papers' cold start, which a from-scratch model lacks and trajectories alone do not teach in minutes.
4. RFT (train_rft, the trainer a torchrun job runs): packed varlen micro-batches, fused log-prob,
   tool responses masked; then greedy and sampled pass@1 on the held-out tasks.
5. RL (train_rl): colocated rollouts on the trainer's own weights, real search / visit on the uvloop
   tool runner, rewards, DUPO batches, mini-batch updates through the fused policy loss; then the
   same evals.
6. A table: untrained vs RFT vs RL pass@1 with the number of tasks and 95% intervals, by hops, the
   paired RL - RFT differences, and where the plots and metrics are.

Every stage is the trainer's own code with a small config (DEMO_OVERRIDES, then the user's --config
and --set); the run directory holds what a cluster run writes: metrics.jsonl, checkpoints, HF
exports, plots, and eval/*.json with every task's outcome. Rerunning resumes: a finished stage
loads its final checkpoint instead of training again. The config is recorded in demo.config.json;
a directory made with another config (or not by the demo) is refused, never mixed into.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
from rich.console import Console
from rich.table import Table

from sailor_engine.config import Config, ConfigError, load_config
from sailor_engine.model import Tokenizer, save_hf
from sailor_engine.model.tokenizer import SPECIAL_TOKENS
from sailor_engine.parallel.checkpoint import atomic_write
from sailor_engine.rollout.format import ChatTemplate
from sailor_engine.synth.pipeline import load_world, summary, synthesize, write_world
from sailor_engine.train.drills import copy_accuracy, copy_drills
from sailor_engine.train.eval import EvalResult, Estimate, evaluate, load_policy, paired_difference
from sailor_engine.train.rft import train_rft
from sailor_engine.train.rl import train_rl
from sailor_engine.train.setup import build_model, init_runtime

# The embedded world, model and schedules: sized for 2 CPU cores, 10.5 min on a Xeon, 13.8-14.5 on an EPYC VM (README).
DEMO_OVERRIDES = (
    # world: 1- and 2-hop questions whose path is forced (no choice an imitating agent cannot make from
    # what it has read), 3000 entities; expert trajectories for 75% of the training answers
    "synth.num_entities=3000", "synth.num_questions=20000", "synth.forced_paths=true", "synth.test_fraction=0.2",
    "synth.max_hops=2", "synth.level_mix=[0.5,0.5,0.0]", "synth.vocab_size=2048", "synth.search_top_k=2",
    "synth.snippet_chars=40", "synth.expert_max_tokens=2048", "synth.expert_fraction=0.75",
    # a ~0.9M-parameter Qwen2-style decoder with tied embeddings (copying names needs them at this size)
    "model.family=qwen2", "model.qkv_bias=true", "model.hidden_size=128", "model.intermediate_size=352",
    "model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=2", "model.max_position_embeddings=2048",
    "rollout.max_new_tokens=96", "rollout.max_turns=8", "rollout.max_context=2048", "rollout.max_batch=128",
    # copy drills, then RFT: a from-scratch model wants a far larger lr than the paper's 5e-6
    "train.out_dir=runs/demo", "train.dtype=float32", "train.micro_batch_tokens=16384", "train.checkpoint_every=100",
    "train.drill.steps=1300", "train.rft.lr=3e-3", "train.rft.batch_size=16", "train.rft.epochs=100",
    "train.rft.max_steps=600", "train.rft.warmup_steps=10",
    # RL: DUPO (V1) on a hop-balanced pool of questions RFT never saw; no pre-filter pass (curated as it goes)
    "algo.preset=dupo", "algo.group_size=8", "algo.updates_per_batch=2", "algo.prefilter=none",
    "train.rl.lr=5e-5", "train.rl.questions_per_step=16", "train.rl.steps=20", "train.rl.exclude_expert_tasks=true",
    "train.rl.balance_hops=true",
    "train.eval_tasks=800", "train.eval_samples=1",
)

UNTRAINED_TASKS = 100  # held-out tasks the untrained model is evaluated on (the first of the RFT / RL ones)


def demo_config(path: str | None = None, overrides: tuple[str, ...] = ()) -> Config:
    """DEMO_OVERRIDES (unless a config file is given), then the user's overrides."""
    return load_config(path, (() if path else DEMO_OVERRIDES) + tuple(overrides))


def _phase(cfg: Config, mode: str, out: Path, **train) -> Config:
    t = msgspec.structs.replace(cfg.train, mode=mode, out_dir=str(out), **train)
    return msgspec.structs.replace(cfg, train=t)


@dataclass
class DemoResult:
    evals: dict[str, dict[str, EvalResult]]  # stage -> mode (greedy / sampled) -> result
    diffs: dict[str, Estimate]  # mode -> RL - RFT, paired
    wall_s: float


def run_demo(cfg: Config, console: Console | None = None) -> DemoResult:
    con = console or Console()
    t0 = time.perf_counter()
    out = Path(cfg.train.out_dir)
    data = out / "data"
    _claim(out, cfg)
    stamp = lambda: f"[dim]({time.perf_counter() - t0:.0f}s)[/dim]"  # noqa: E731

    con.rule("1. synthesis")
    if not (data / "summary.json").is_file():
        write_world(synthesize(cfg.synth), data)
    world = load_world(data, cfg.synth)
    s = summary(world)
    con.print(f"{s['entities']} entities, {len(world.train)} training / {len(world.test)} held-out questions, "
              f"{len(world.pages)} pages, {len(world.experts)} expert trajectories (~{s['expert_tokens_mean']:.0f} "
              f"tokens each), vocab {Tokenizer(world.tokenizer).vocab_size} {stamp()}")
    cfg = msgspec.structs.replace(cfg, train=msgspec.structs.replace(cfg.train, data_dir=str(data)))
    rt = init_runtime(cfg)
    tpl = ChatTemplate(Tokenizer(world.tokenizer))
    system = world.system_prompt
    tasks = world.test[:cfg.train.eval_tasks]
    evals: dict[str, dict[str, EvalResult]] = {}

    def run_evals(stage: str, model, samples: int, n: int | None = None) -> None:
        evals[stage] = {}
        for mode, k in (("greedy", 0), ("sampled", samples)):
            if mode == "sampled" and k == 0:
                continue
            path = out / "eval" / f"{stage}.{mode}.json"
            if path.is_file():
                res = EvalResult.load(path)
            else:
                res = evaluate(model, world.web, tpl, tasks[:n], cfg, rt, samples=k, system=system, seed=cfg.train.seed)
                res.save(path)
            evals[stage][mode] = res
            con.print(f"{stage} {mode} pass@1 {res.pass1()}  well-formed {100 * res.format_ok():.0f}%  {stamp()}")

    con.rule("2. the untrained model")
    # The floor: an untrained model rambles to the turn limit, so a few tasks bound it tightly enough.
    run_evals("untrained", build_model(cfg, tpl.tok.vocab_size, rt), 0, UNTRAINED_TASKS)

    base = None
    if cfg.train.drill.steps:
        con.rule("3. copy drills (what a pretrained LLM brings to the cold start)")
        base = _base_model(cfg, out / "base", tpl.tok.vocab_size, rt, con, stamp)

    con.rule("4. RFT on expert trajectories (tool responses masked)")
    rft_cfg = _phase(cfg, "rft", out / "rft", **({"init_from": str(base)} if base else {}))
    train_rft(rft_cfg, rt)
    run_evals("rft", load_policy(out / "rft" / "hf"), cfg.train.eval_samples)

    con.rule("5. RL (DUPO) on questions RFT never saw")
    rl_cfg = _phase(cfg, "rl", out / "rl", init_from=str(out / "rft" / "hf"))
    train_rl(rl_cfg, rt)
    run_evals("rl", load_policy(out / "rl" / "hf"), cfg.train.eval_samples)

    con.rule("6. held-out pass@1")
    diffs = {m: paired_difference(evals["rl"][m], evals["rft"][m]) for m in evals["rl"]}
    wall = time.perf_counter() - t0
    _table(con, evals, diffs)
    (out / "demo.json").write_text(json.dumps({
        "evals": {st: {m: r.summary() for m, r in ms.items()} for st, ms in evals.items()},
        "rl_minus_rft": {m: d.as_dict() for m, d in diffs.items()}, "wall_s": wall}, indent=1))
    con.print(f"metrics: {out}/rft/metrics.jsonl, {out}/rl/metrics.jsonl; plots: {out}/rft/plots, {out}/rl/plots; "
              f"every task's outcome: {out}/eval/; summary: {out}/demo.json")
    con.print(f"done in {wall / 60:.1f} min")
    return DemoResult(evals, diffs, wall)


def _claim(out: Path, cfg: Config) -> None:
    """Record the config in out/demo.config.json, or refuse a directory a demo with another config made
    (resuming its stages would mix two runs: another world, other checkpoints)."""
    path, mine = out / "demo.config.json", msgspec.json.format(msgspec.json.encode(cfg), indent=1)
    if path.is_file():
        if path.read_bytes() != mine:
            raise ConfigError(f"{out}: holds a demo run made with another config ({path}); remove the directory "
                              f"or pass --set train.out_dir=<new dir>")
        return
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise ConfigError(f"{out}: not empty and not a demo run directory (no {path.name}); remove it or pass "
                          f"--set train.out_dir=<new dir>")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(mine))


def _base_model(cfg: Config, out: Path, vocab_size: int, rt, con: Console, stamp) -> Path:
    """Copy drills on the random init (train.drill); the HF directory RFT starts from (kept: a rerun reuses it)."""
    hf = out / "hf"
    if (hf / "config.json").is_file():
        return hf
    model = build_model(cfg, vocab_size, rt)
    probe = dict(first_token=len(SPECIAL_TOKENS), vocab_size=vocab_size, seed=cfg.train.seed + 1)
    before = copy_accuracy(model, **probe)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "w") as f:
        def log(row: dict) -> None:
            f.write(json.dumps(row) + "\n")
            if row["step"] % 100 == 0 or row["step"] == cfg.train.drill.steps:
                con.print(f"drill {row['step']}/{cfg.train.drill.steps}  loss {row['loss']:.3f}  "
                          f"copy accuracy {100 * row['copy_accuracy']:.0f}%  {stamp()}")
        copy_drills(model, cfg.train.drill, first_token=probe["first_token"], vocab_size=vocab_size,
                    seed=cfg.train.seed, log=log)
    con.print(f"copy drills: copying a just-read random sequence {100 * before:.1f}% -> "
              f"{100 * copy_accuracy(model, **probe):.1f}% (fresh sequences)")
    tmp = out / "hf.tmp"
    save_hf(model, tmp)
    tmp.rename(hf)
    return hf


def _table(con: Console, evals: dict[str, dict[str, EvalResult]], diffs: dict[str, Estimate]) -> None:
    hops = sorted({h for ms in evals.values() for r in ms.values() for h in r.by("hops")})
    table = Table(title="pass@1 on held-out questions (95% intervals)")
    for col in ["model", "decoding", "all", *[f"{h}-hop" for h in hops], "well-formed"]:
        table.add_column(col, justify="left" if col in ("model", "decoding") else "right")
    for stage, ms in evals.items():
        for mode, r in ms.items():
            by = r.by("hops")
            label = mode if mode == "greedy" else f"sampled x{r.samples}, T={r.temperature:g}"
            table.add_row(stage, label, str(r.pass1()), *[str(by[h]) if h in by else "-" for h in hops],
                          f"{100 * r.format_ok():.0f}%")
    for mode, d in diffs.items():
        table.add_row("RL - RFT", f"{mode}, paired", f"{100 * d.mean:+.1f} [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}] pts",
                      *["" for _ in hops], "")
    con.print(table)
