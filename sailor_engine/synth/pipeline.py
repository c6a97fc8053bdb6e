"""The synthesis pipeline: config -> World (in memory) -> files on disk, with a progress bar and a summary.

    world = synthesize(cfg)            # graph, tasks, pages, offline web, tokenizer, expert trajectories
    run_synth(cfg, Path("out"))        # writes the files below and prints the summary (the CLI calls this)
    world = load_world(Path("out"))    # reads them back (tasks, pages, web, tokenizer, graph)

Files: graph.jsonl, tasks.train.jsonl, tasks.test.jsonl, corpus.jsonl, index/ (bm25s), tokenizer.json,
experts.jsonl (train tasks only), summary.json. Byte-identical under a seed: every random choice
comes from generators seeded by (cfg.seed, stage), records are msgspec-encoded in a fixed order.
The train / test split is by answer entity (a hash of seed and id), so no test answer is ever a
training answer.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import msgspec
import numpy as np
from tokenizers import Tokenizer

from sailor_engine.env.tools import OfflineWeb, Page
from sailor_engine.synth.bpe import train_tokenizer
from sailor_engine.synth.config import SynthConfig
from sailor_engine.synth.corpus import build_corpus, entity_urls
from sailor_engine.synth.constraints import Checker
from sailor_engine.synth.expert import (SYSTEM_PROMPT, Trajectory, chatml, expert_trajectories, filter_trajectories,
                                        forced_path)
from sailor_engine.synth.generate import generate_tasks
from sailor_engine.synth.graph import Graph, load_triples, synthetic_world, write_graph
from sailor_engine.synth.questions import Rewrite, Task

T = TypeVar("T")
Advance = Callable[[int], None]
Stage = Callable[[str, int], Advance]  # (description, total steps) -> advance(n)


@dataclass
class World:
    cfg: SynthConfig
    graph: Graph
    train: list[Task]
    test: list[Task]
    pages: list[Page]
    web: OfflineWeb
    tokenizer: Tokenizer
    experts: list[Trajectory]

    @property
    def system_prompt(self) -> str | None:
        """The system prompt the expert trajectories (so an RFT model) were rendered with; None without experts."""
        return self.experts[0].messages[0].content if self.experts else None


def _no_progress(desc: str, total: int) -> Advance:
    return lambda n: None


def is_test(seed: int | str, entity_id: str, fraction: float) -> bool:
    """Whether an entity falls in a `fraction` share keyed by `seed` (a hash: stable, independent of order)."""
    h = hashlib.blake2b(f"{seed}:{entity_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def synthesize(cfg: SynthConfig, rewrite: Rewrite | None = None, stage: Stage = _no_progress) -> World:
    """Build the whole world in memory (no files)."""
    if cfg.graph != "synthetic" and not Path(cfg.graph).is_file():
        raise ValueError(f"synth.graph: {cfg.graph!r} is neither 'synthetic' nor an existing triples file")
    adv = stage("graph", 1)
    g = synthetic_world(cfg) if cfg.graph == "synthetic" else load_triples(cfg.graph)
    urls = entity_urls(g)
    adv(1)
    tasks = generate_tasks(g, cfg, urls, np.random.default_rng([cfg.seed, 2]), rewrite,
                           stage("questions", cfg.num_questions))
    if cfg.forced_paths:
        checker = Checker(g)
        tasks = [t for t in tasks if forced_path(g, checker, t)]
    train = [t for t in tasks if not is_test(cfg.seed, t.answer_id, cfg.test_fraction)]
    test = [t for t in tasks if is_test(cfg.seed, t.answer_id, cfg.test_fraction)]
    adv = stage("pages + search index", 2)
    pages = build_corpus(g, cfg.distractor_pages, np.random.default_rng([cfg.seed, 3]))
    adv(1)
    web = OfflineWeb(pages, cfg.search_top_k, cfg.snippet_chars)
    adv(1)
    # The expert share by answer entity too (another hash): an RL pool of the rest has answers RFT never saw.
    solve = [t for t in train if cfg.expert_fraction == 1 or is_test(f"{cfg.seed}:experts", t.answer_id, cfg.expert_fraction)]
    trajs = expert_trajectories(g, web, urls, solve, stage("expert trajectories", len(solve)))
    adv = stage("tokenizer", 1)
    texts = [p.text for p in pages] + [t.question for t in tasks] + [chatml(t.messages) for t in trajs] + [SYSTEM_PROMPT]
    tok = train_tokenizer(texts, cfg.vocab_size, cfg.max_token_chars, cfg.min_pair_frequency)
    adv(1)
    count = lambda s: len(tok.encode(s).ids)  # noqa: E731
    experts = filter_trajectories(trajs, count, cfg.expert_max_tokens, cfg.expert_min_tool_calls)
    return World(cfg, g, train, test, pages, web, tok, experts)


def summary(world: World) -> dict:
    tasks = world.train + world.test
    return {
        "entities": world.graph.num_entities,
        "relations": int(len(world.graph.src)),
        "tasks": {"requested": world.cfg.num_questions, "train": len(world.train), "test": len(world.test)},
        "level": dict(sorted(Counter(str(t.level) for t in tasks).items())),
        "hops": dict(sorted(Counter(str(t.hops) for t in tasks).items())),
        "obfuscation": dict(sorted(Counter(o for t in tasks for o in t.obfuscations).items())),
        "pages": len(world.pages),
        "vocab": world.tokenizer.get_vocab_size(),
        "experts": len(world.experts),
        "expert_tokens_mean": round(float(np.mean([t.num_tokens for t in world.experts])), 1) if world.experts else 0.0,
        # what search returns: the expert trajectories hold results of these settings, so every later
        # reader of this world (RL, eval) must serve the same (load_world takes them from here)
        "web": {"search_top_k": world.cfg.search_top_k, "snippet_chars": world.cfg.snippet_chars},
    }


def _write_jsonl(path: Path, records: list) -> None:
    enc = msgspec.json.Encoder()
    with open(path, "wb") as f:
        for r in records:
            f.write(enc.encode(r) + b"\n")


def read_jsonl(path: Path, type_: type[T]) -> list[T]:
    """Decode one record per line; an error names the file and line."""
    dec = msgspec.json.Decoder(type_)
    out = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(dec.decode(line))
                except msgspec.DecodeError as e:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
    return out


def write_world(world: World, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_graph(world.graph, out_dir / "graph.jsonl")
    _write_jsonl(out_dir / "tasks.train.jsonl", world.train)
    _write_jsonl(out_dir / "tasks.test.jsonl", world.test)
    _write_jsonl(out_dir / "corpus.jsonl", world.pages)
    _write_jsonl(out_dir / "experts.jsonl", world.experts)
    world.web.save(out_dir / "index")
    world.tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "summary.json").write_bytes(msgspec.json.format(msgspec.json.encode(summary(world))) + b"\n")


def load_world(out_dir: Path, cfg: SynthConfig | None = None) -> World:
    """Read a world written by run_synth. Search serves the settings it was synthesized with (its
    summary.json "web"; the expert trajectories hold such results), whatever `cfg` says; cfg's
    search_top_k / snippet_chars are used only for a world written without them."""
    cfg = cfg or SynthConfig()
    web = json.loads((out_dir / "summary.json").read_text()).get("web") if (out_dir / "summary.json").is_file() else None
    if web:
        cfg = msgspec.structs.replace(cfg, search_top_k=web["search_top_k"], snippet_chars=web["snippet_chars"])
    pages = read_jsonl(out_dir / "corpus.jsonl", Page)
    return World(cfg, load_triples(out_dir / "graph.jsonl"), read_jsonl(out_dir / "tasks.train.jsonl", Task),
                 read_jsonl(out_dir / "tasks.test.jsonl", Task), pages,
                 OfflineWeb.load(out_dir / "index", pages, cfg.search_top_k, cfg.snippet_chars),
                 Tokenizer.from_file(str(out_dir / "tokenizer.json")), read_jsonl(out_dir / "experts.jsonl", Trajectory))


def run_synth(cfg: SynthConfig, out_dir: Path, rewrite: Rewrite | None = None) -> None:
    """Synthesize, write every file under out_dir, print a summary (rich progress bar while it runs)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console()
    with Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        def stage(desc: str, total: int) -> Advance:
            tid = bar.add_task(desc, total=total)
            return lambda n: bar.advance(tid, n)

        world = synthesize(cfg, rewrite, stage)
        adv = stage("write files", 1)
        write_world(world, Path(out_dir))
        adv(1)
    s = summary(world)
    table = Table(title=f"synth: {out_dir}", show_header=False)
    for key, value in s.items():
        table.add_row(key, ", ".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict) else str(value))
    console.print(table)
    kept = len(world.train) + len(world.test)
    if cfg.forced_paths:  # fewer by design
        console.print(f"synth.forced_paths kept {kept} of the {cfg.num_questions} questions")
    elif kept < cfg.num_questions:
        console.print(f"[yellow]warning:[/] the graph yielded {kept} of {cfg.num_questions} questions "
                      f"(too small for the requested levels and sizes)")
