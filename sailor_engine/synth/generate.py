"""The question sampler loop: rare seeds -> V2 expansion -> deduped walks -> balanced targets -> tasks.

Levels follow `cfg.level_mix` exactly (largest-remainder quotas, shuffled). Each seed's expanded
graph yields a few subgraphs of distinct labelled shapes; a walk whose shape was already used for
that seed, a target with no valid position for the level, a question that cannot be made unique, or
one whose constraints repeat an earlier question's is skipped and the loop moves on. Everything draws from one seeded generator, in order.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import msgspec
import numpy as np

from sailor_engine.synth.config import SynthConfig
from sailor_engine.synth.constraints import Checker
from sailor_engine.synth.graph import Graph
from sailor_engine.synth.obfuscate import distractor_noise
from sailor_engine.synth.questions import Rewrite, Task, build_question, obfuscations, render
from sailor_engine.synth.sample import Dedup, Subgraph, TargetBalancer, expand, random_walk, rare_seeds

QUESTIONS_PER_SEED = 3


def level_quotas(mix: tuple[float, float, float], n: int) -> list[int]:
    """Questions per level 1/2/3 summing to n, by largest remainder."""
    w = np.asarray(mix, float) / sum(mix)
    base = np.floor(w * n).astype(int)
    for k in np.argsort(-(w * n - base), kind="stable")[: n - base.sum()]:
        base[k] += 1
    return base.tolist()


def eccentricity(g: Graph, sub: Subgraph, v: int) -> int:
    adj: dict[int, list[int]] = {u: [] for u in sub.nodes}
    for e in sub.edges:
        s, d = int(g.src[e]), int(g.dst[e])
        adj[s].append(d)
        adj[d].append(s)
    dist, queue = {v: 0}, deque([v])
    while queue:
        u = queue.popleft()
        for w in adj[u]:
            if w not in dist:
                dist[w] = dist[u] + 1
                queue.append(w)
    return max(dist.values())


def _walk_size(level: int, cfg: SynthConfig, local_nodes: int, rng: np.random.Generator) -> int:
    lo = 2 if level == 1 else max(3 if level == 2 else 2, cfg.subgraph_min_nodes)
    hi = 2 if level == 1 else min(cfg.subgraph_max_nodes, local_nodes)
    return int(rng.integers(lo, hi + 1)) if hi >= lo else 0


def generate_tasks(g: Graph, cfg: SynthConfig, urls: list[str], rng: np.random.Generator,
                   rewrite: Rewrite | None = None, advance: Callable[[int], None] | None = None) -> list[Task]:
    """cfg.num_questions verified-unique tasks (fewer only if the graph runs out of material)."""
    if cfg.level_mix[1] > 0 and (cfg.subgraph_max_nodes < 3 or cfg.max_hops < 2):
        raise ValueError("synth.level_mix asks for level-2 (multi-hop) questions, which need "
                         "synth.subgraph_max_nodes >= 3 and synth.max_hops >= 2")
    checker, balancer = Checker(g), TargetBalancer(g)
    todo = level_quotas(cfg.level_mix, cfg.num_questions)
    pending = rng.permutation(np.repeat([1, 2, 3], todo)).tolist()
    tasks: list[Task] = []
    attempts, max_attempts = 0, 40 * cfg.num_questions + 1000
    seeds: list[int] = []
    seen: set[bytes] = set()
    while pending and attempts < max_attempts:
        if not seeds:
            seeds = rare_seeds(g, max(1, len(pending) // QUESTIONS_PER_SEED + 1), rng).tolist()
            if not seeds:  # no entity has a relation: nothing to ask
                break
        local = expand(g, seeds.pop(), cfg.expand_new_prob, cfg.expand_edge_budget, rng)
        dedup = Dedup(g)
        for _ in range(QUESTIONS_PER_SEED):
            attempts += 1
            level = pending[-1]
            k = _walk_size(level, cfg, len(local.nodes), rng)
            sub = random_walk(g, local, k, rng) if k else None
            if sub is None or not dedup.add(sub):
                continue
            lo_hops = 2 if level == 2 else 1
            hi_hops = 1 if level == 1 else cfg.max_hops
            target = balancer.pick(sub, rng, lambda v: lo_hops <= eccentricity(g, sub, v) <= hi_hops)
            if target is None:
                continue
            built = build_question(g, checker, sub, target, level, cfg, rng)
            if built is None:
                continue
            root, hops, nodes = built
            key = msgspec.json.encode(root)
            if key in seen:  # the same constraints again (small worlds): the same question
                continue
            seen.add(key)
            noise = []
            if cfg.obfuscation.distractor_noise > 0 and rng.random() < cfg.obfuscation.distractor_noise:
                other = int(rng.integers(g.num_entities))
                if other not in nodes and (s := distractor_noise(g, other, rng)) is not None:
                    noise.append(s)
            task = Task(f"q{len(tasks):06d}", render(g, root, noise), g.names[target], list(g.aliases[target]),
                        g.ids[target], level, hops, obfuscations(root, noise), root,
                        [g.ids[v] for v in nodes], [urls[v] for v in nodes], noise)
            if rewrite is not None:
                task.question = rewrite(task.question, task)
            tasks.append(task)
            pending.pop()
            if advance is not None:
                advance(1)
            if not pending:
                break
    return tasks
