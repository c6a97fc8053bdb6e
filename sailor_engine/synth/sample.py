"""Subgraph sampling, SailorFog-QA-V2 style: rare seeds, V2 expansion, random walks, dedup, orbits.

1. `rare_seeds`: seeds drawn with weight 1/(1+degree)^2, so obscure entities start most questions.
2. `expand`: grow a local graph from a seed under an edge budget; each step continues from the
   newest node with probability `expand_new_prob`, else from a uniformly chosen earlier node, and a
   neighbour already in the local graph closes a cycle (V2's dense links). Each node keeps its
   provenance: the page url it was reached from.
3. `random_walk`: a walk inside the local graph until it has k distinct nodes; the subgraph is the
   walked nodes with every local edge among them (so cycles survive).
4. `Dedup`: Weisfeiler-Leman hash (node label = type, edge label = predicate and direction) as the
   bucket key, then an exact isomorphism check inside the bucket, so a WL collision between
   non-isomorphic shapes never drops a subgraph.
5. `orbits` + `TargetBalancer`: automorphism orbits of the labelled subgraph; the question target is
   the least-used orbit of that shape so far, so targets spread over structurally distinct
   positions rather than in proportion to orbit size.

Subgraphs are at most a handful of nodes, so exact isomorphism and automorphisms enumerate the
bijections that preserve WL colours (usually a few; never more than 6! = 720).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from sailor_engine.synth.graph import Graph


@dataclass(frozen=True)
class Subgraph:
    """Entities `nodes` (graph indices, sorted) and `edges` (graph edge indices, sorted) among them."""

    nodes: tuple[int, ...]
    edges: tuple[int, ...]


@dataclass
class LocalGraph:
    seed: int
    nodes: list[int]  # in order of discovery
    edges: list[int]
    provenance: dict[int, int]  # node -> node whose page linked to it (the seed: itself)


def rare_seeds(g: Graph, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct seeds among entities with a relation, weighted toward low degree (all if k >= count)."""
    deg = g.degree()
    cand = np.flatnonzero(deg > 0)
    if len(cand) == 0:
        return cand
    w = 1.0 / (1.0 + deg[cand]) ** 2
    k = min(k, len(cand))
    return rng.choice(cand, size=k, replace=False, p=w / w.sum())


def expand(g: Graph, seed: int, new_prob: float, edge_budget: int, rng: np.random.Generator) -> LocalGraph:
    """V2 expansion from `seed` (see module docstring); stops at the budget or when nothing is left."""
    local = LocalGraph(seed, [seed], [], {seed: seed})
    taken: set[int] = set()
    stalls = 0
    while len(local.edges) < edge_budget and stalls < 4 * edge_budget:
        if rng.random() < new_prob:
            u = local.nodes[-1]
        else:
            u = local.nodes[int(rng.integers(len(local.nodes)))]
        lo, hi = int(g.nbr_ptr[u]), int(g.nbr_ptr[u + 1])
        if hi == lo:
            stalls += 1
            continue
        h = int(rng.integers(lo, hi))
        e, v = int(g.nbr_edge[h]), int(g.nbr[h])
        if e in taken:
            stalls += 1
            continue
        taken.add(e)
        local.edges.append(e)
        if v not in local.provenance:
            local.provenance[v] = u
            local.nodes.append(v)
    return local


def random_walk(g: Graph, local: LocalGraph, k: int, rng: np.random.Generator) -> Subgraph | None:
    """Walk local edges from a random node until k distinct nodes (None if the walk gets stuck)."""
    adj: dict[int, list[int]] = defaultdict(list)
    for e in local.edges:
        s, d = int(g.src[e]), int(g.dst[e])
        adj[s].append(d)
        adj[d].append(s)
    u = local.nodes[int(rng.integers(len(local.nodes)))]
    seen = {u}
    for _ in range(8 * k):
        if len(seen) == k:
            break
        u = adj[u][int(rng.integers(len(adj[u])))]
        seen.add(u)
    if len(seen) < k:
        return None
    edges = tuple(sorted(e for e in set(local.edges) if int(g.src[e]) in seen and int(g.dst[e]) in seen))
    return Subgraph(tuple(sorted(seen)), edges)


# ------------------------------------------------------------------------------ WL hash, isomorphism

def _labelled(g: Graph, sub: Subgraph) -> tuple[list[str], list[tuple[int, int, str]]]:
    """Node labels and (local src, local dst, predicate) triples of a subgraph."""
    pos = {v: i for i, v in enumerate(sub.nodes)}
    labels = [g.type_of(v) for v in sub.nodes]
    edges = [(pos[int(g.src[e])], pos[int(g.dst[e])], g.relations[g.pred[e]].name) for e in sub.edges]
    return labels, edges


def _digest(x: object) -> str:
    # hashlib, not hash(): str hashes are salted per process and the output must be reproducible.
    return hashlib.blake2b(repr(x).encode(), digest_size=8).hexdigest()


def wl_colors(labels: list[str], edges: list[tuple[int, int, str]], rounds: int | None = None) -> list[str]:
    """Weisfeiler-Leman colours of a directed, node- and edge-labelled graph (len(labels) rounds)."""
    colors = [_digest(("node", lab)) for lab in labels]
    for _ in range(rounds if rounds is not None else len(labels)):
        sig: list[list[tuple[str, str, str]]] = [[] for _ in labels]
        for s, d, p in edges:
            sig[s].append(("out", p, colors[d]))
            sig[d].append(("in", p, colors[s]))
        colors = [_digest((c, sorted(x))) for c, x in zip(colors, sig)]
    return colors


def wl_hash(labels: list[str], edges: list[tuple[int, int, str]]) -> str:
    return _digest(sorted(Counter(wl_colors(labels, edges)).items()))


def _color_maps(ca: list[str], cb: list[str]):
    """Every bijection a -> b that maps each node to a node of the same WL colour."""
    classes_a: dict[str, list[int]] = defaultdict(list)
    classes_b: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(ca):
        classes_a[c].append(i)
    for i, c in enumerate(cb):
        classes_b[c].append(i)
    if {c: len(v) for c, v in classes_a.items()} != {c: len(v) for c, v in classes_b.items()}:
        return
    keys = sorted(classes_a)
    for perms in itertools.product(*(itertools.permutations(classes_b[c]) for c in keys)):
        m = [0] * len(ca)
        for c, perm in zip(keys, perms):
            for i, j in zip(classes_a[c], perm):
                m[i] = j
        yield m


def _isomorphisms(a: tuple[list[str], list], b: tuple[list[str], list]):
    (la, ea), (lb, eb) = a, b
    if len(la) != len(lb) or len(ea) != len(eb):
        return
    ca, cb = wl_colors(la, ea), wl_colors(lb, eb)
    target = Counter(eb)
    for m in _color_maps(ca, cb):
        if Counter((m[s], m[d], p) for s, d, p in ea) == target:
            yield m


def is_isomorphic(a: tuple[list[str], list], b: tuple[list[str], list]) -> bool:
    return next(_isomorphisms(a, b), None) is not None


def orbits(labels: list[str], edges: list[tuple[int, int, str]]) -> list[list[int]]:
    """Automorphism orbits (lists of local node positions), ordered by their smallest member."""
    parent = list(range(len(labels)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for m in _isomorphisms((labels, edges), (labels, edges)):
        for i, j in enumerate(m):
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(labels)):
        groups[find(i)].append(i)
    return sorted(groups.values())


class Dedup:
    """Keeps one subgraph per isomorphism class of labelled shapes (WL bucket + exact check)."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.buckets: dict[str, list[tuple[list[str], list]]] = defaultdict(list)

    def add(self, sub: Subgraph) -> bool:
        """True if `sub` is new (and is now remembered), False if an isomorphic one was kept before."""
        lab = _labelled(self.g, sub)
        bucket = self.buckets[wl_hash(*lab)]
        if any(is_isomorphic(lab, other) for other in bucket):
            return False
        bucket.append(lab)
        return True


class TargetBalancer:
    """Chooses a target per subgraph: the least-used orbit for that shape, ties broken at random."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.used: Counter[tuple[str, str]] = Counter()

    def pick(self, sub: Subgraph, rng: np.random.Generator, allowed=lambda node: True) -> int | None:
        labels, edges = _labelled(self.g, sub)
        shape, colors = wl_hash(labels, edges), wl_colors(labels, edges)
        cands = [o for o in orbits(labels, edges) if allowed(sub.nodes[o[0]])]
        if not cands:
            return None
        # Orbit members share a WL colour, so (shape, colour) names the orbit across subgraphs.
        least = min(self.used[shape, colors[o[0]]] for o in cands)
        best = [o for o in cands if self.used[shape, colors[o[0]]] == least]
        orbit = best[int(rng.integers(len(best)))]
        self.used[shape, colors[orbit[0]]] += 1
        return sub.nodes[orbit[int(rng.integers(len(orbit)))]]
