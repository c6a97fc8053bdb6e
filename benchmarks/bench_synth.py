"""Synthesis throughput: 10k verified-unique questions from a 50k-entity world, stage by stage.

Stages, each timed on its own (wall clock, CPU): world generation, question sampling (V2 expansion,
walks, WL dedup, orbit balancing, obfuscation, whole-graph uniqueness), page rendering, the BM25
index build, expert trajectories through the real tools, tokenizer training, and the whole
`synthesize` call. Target (issue 5): world + questions <= 120 s on 2 cores.

    python benchmarks/bench_synth.py [--entities 50000] [--questions 10000] [--reps 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, record, time_fn  # noqa: E402

from sailor_engine.env.tools import OfflineWeb  # noqa: E402
from sailor_engine.synth.bpe import train_tokenizer  # noqa: E402
from sailor_engine.synth.config import SynthConfig  # noqa: E402
from sailor_engine.synth.corpus import build_corpus, entity_urls  # noqa: E402
from sailor_engine.synth.expert import chatml, expert_trajectories  # noqa: E402
from sailor_engine.synth.generate import generate_tasks  # noqa: E402
from sailor_engine.synth.graph import synthetic_world  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entities", type=int, default=50_000)
    ap.add_argument("--questions", type=int, default=10_000)
    ap.add_argument("--experts", type=int, default=2_000, help="tasks given to the expert oracle")
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    cfg = SynthConfig(num_entities=args.entities, num_questions=args.questions)
    timing = lambda fn: time_fn(fn, "cpu", warmup=0, reps=args.reps)  # noqa: E731
    state: dict = {}

    def world():
        state["g"] = synthetic_world(cfg)
        state["urls"] = entity_urls(state["g"])

    def questions():
        state["tasks"] = generate_tasks(state["g"], cfg, state["urls"], np.random.default_rng([cfg.seed, 2]))

    def pages():
        state["pages"] = build_corpus(state["g"], cfg.distractor_pages, np.random.default_rng([cfg.seed, 3]))

    def index():
        state["web"] = OfflineWeb(state["pages"], cfg.search_top_k, cfg.snippet_chars)

    def experts():
        state["trajs"] = expert_trajectories(state["g"], state["web"], state["urls"], state["tasks"][: args.experts])

    def tokenizer():
        texts = [p.text for p in state["pages"]] + [chatml(t.messages) for t in state["trajs"]]
        state["tok"] = train_tokenizer(texts, cfg.vocab_size, cfg.max_token_chars, cfg.min_pair_frequency)

    rows = []
    for name, fn, unit, count in (("world", world, "entities", lambda: cfg.num_entities),
                                  ("questions", questions, "questions", lambda: len(state["tasks"])),
                                  ("pages", pages, "pages", lambda: len(state["pages"])),
                                  ("search index", index, "pages", lambda: len(state["pages"])),
                                  ("experts", experts, "tasks", lambda: min(args.experts, len(state["tasks"]))),
                                  ("tokenizer", tokenizer, "texts", lambda: len(state["pages"]) + len(state["trajs"]))):
        t = timing(fn)
        rows.append({"stage": name, **t, "items": count(), "unit": unit, "items_per_s": count() / (t["median_ms"] / 1e3)})
    world_q = rows[0]["median_ms"] + rows[1]["median_ms"]
    rows.append({"stage": "world + questions", "median_ms": world_q, "items": len(state["tasks"]), "unit": "questions",
                 "items_per_s": len(state["tasks"]) / (world_q / 1e3)})
    tasks = state["tasks"]
    extra = {"levels": {str(k): sum(t.level == k for t in tasks) for k in (1, 2, 3)},
             "experts_solved": len(state["trajs"]), "target_s": 120.0, "met": world_q / 1e3 <= 120.0}
    print_table(f"synthesis, {cfg.num_entities} entities, {cfg.num_questions} questions (CPU)", rows,
                ["stage", "median_ms", "p20_ms", "p80_ms", "items", "unit", "items_per_s"])
    print(f"\nworld + questions: {world_q / 1e3:.1f} s (target <= 120 s); levels {extra['levels']}; "
          f"experts solved {extra['experts_solved']} / {min(args.experts, len(tasks))}")
    record("bench_synth", {"entities": cfg.num_entities, "questions": cfg.num_questions, "experts": args.experts,
                           "reps": args.reps, **extra}, rows, "cpu")


if __name__ == "__main__":
    main()
