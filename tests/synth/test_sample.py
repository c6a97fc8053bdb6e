"""Sampling: V2 expansion, random walks, WL dedup and automorphism orbits checked against networkx."""

from __future__ import annotations

import itertools
from collections import Counter

import networkx as nx
import numpy as np
import pytest
from networkx.algorithms import isomorphism as iso

from sailor_engine.synth.config import SynthConfig
from sailor_engine.synth.graph import make_graph, synthetic_world
from sailor_engine.synth.sample import (Dedup, Subgraph, TargetBalancer, _labelled, expand, is_isomorphic, orbits,
                                        random_walk, rare_seeds, wl_hash)


@pytest.fixture(scope="module")
def world():
    return synthetic_world(SynthConfig(seed=2, num_entities=1200))


def _nx(labels, edges) -> nx.MultiDiGraph:
    h = nx.MultiDiGraph()
    h.add_nodes_from((i, {"label": lab}) for i, lab in enumerate(labels))
    h.add_edges_from((s, d, {"label": p}) for s, d, p in edges)
    return h


def _nx_iso(a, b) -> bool:
    return nx.is_isomorphic(_nx(*a), _nx(*b), node_match=iso.categorical_node_match("label", None),
                            edge_match=iso.categorical_multiedge_match("label", None))


def test_rare_seeds_prefer_low_degree(world):
    seeds = rare_seeds(world, 200, np.random.default_rng(0))
    deg = world.degree()
    assert len(set(seeds.tolist())) == 200 and (deg[seeds] > 0).all()
    assert np.median(deg[seeds]) < np.median(deg[deg > 0]) or np.mean(deg[seeds]) < np.mean(deg[deg > 0])


def test_expansion_and_walks(world):
    g, rng = world, np.random.default_rng(1)
    cycles = 0
    for seed in rare_seeds(g, 40, rng).tolist():
        local = expand(g, seed, 0.6, 12, rng)
        assert len(local.edges) <= 12 and len(set(local.edges)) == len(local.edges)
        ends = {int(g.src[e]) for e in local.edges} | {int(g.dst[e]) for e in local.edges}
        assert ends <= set(local.nodes) and local.nodes[0] == seed
        h = nx.Graph([(int(g.src[e]), int(g.dst[e])) for e in local.edges])
        if local.edges:
            assert nx.is_connected(h)
        cycles += len(local.edges) >= len(local.nodes)  # more edges than a tree: a cycle was closed
        for v in local.nodes[1:]:  # provenance: the node whose page linked to v is a neighbour
            assert local.provenance[v] in {int(x) for x in g.nbr[g.nbr_ptr[v]:g.nbr_ptr[v + 1]]}
        for k in (2, 3, 4):
            sub = random_walk(g, local, k, rng)
            if sub is None:
                continue
            assert len(sub.nodes) == k and nx.is_connected(nx.Graph([(int(g.src[e]), int(g.dst[e])) for e in sub.edges]))
            # Induced: every local edge among the walked nodes is kept.
            assert set(sub.edges) == {e for e in local.edges if int(g.src[e]) in sub.nodes and int(g.dst[e]) in sub.nodes}
    assert cycles > 0


def _random_labelled(rng, n: int) -> tuple[list[str], list[tuple[int, int, str]]]:
    labels = [["p", "o"][int(rng.integers(2))] for _ in range(n)]
    edges = [(i, int(rng.integers(i)), ["r", "s"][int(rng.integers(2))]) for i in range(1, n)]  # a tree
    if n >= 3 and rng.random() < 0.5:
        a, b = rng.choice(n, 2, replace=False).tolist()
        edges.append((a, b, "r"))
    return labels, edges


def _permuted(rng, labels, edges):
    perm = rng.permutation(len(labels)).tolist()
    new_labels = [None] * len(labels)
    for i, j in enumerate(perm):
        new_labels[j] = labels[i]
    return new_labels, [(perm[s], perm[d], p) for s, d, p in edges]


def test_isomorphism_agrees_with_networkx():
    rng = np.random.default_rng(3)
    graphs = [_random_labelled(rng, int(rng.integers(2, 6))) for _ in range(60)]
    graphs += [_permuted(rng, *graphs[int(rng.integers(60))]) for _ in range(40)]
    for a, b in itertools.combinations(graphs[::3], 2):
        assert is_isomorphic(a, b) == _nx_iso(a, b)
        if _nx_iso(a, b):
            assert wl_hash(*a) == wl_hash(*b)


class _FakeGraph:
    """Enough of Graph for Dedup / TargetBalancer on hand-made labelled graphs."""


def _as_graph(shapes):
    """One Graph holding every shape as a disjoint component; Subgraph per shape."""
    labels, src, pred, dst, subs, rels = [], [], [], [], [], ["r", "s"]
    for lab, edges in shapes:
        base = len(labels)
        labels += lab
        first_edge = len(src)
        for s, d, p in edges:
            src.append(base + s), dst.append(base + d), pred.append(rels.index(p))
        subs.append((tuple(range(base, base + len(lab))), first_edge, len(src)))
    types = sorted(set(labels))
    from sailor_engine.synth.graph import Relation
    g = make_graph([f"x{i}" for i in range(len(labels))], [f"n{i}" for i in range(len(labels))], [[]] * len(labels),
                   [types.index(t) for t in labels], types, {}, {}, {}, {},
                   tuple(Relation(r, None, None, r, r) for r in rels), src, pred, dst)
    out = []
    for nodes, _, _ in subs:
        es = tuple(int(e) for e in range(len(g.src)) if int(g.src[e]) in nodes and int(g.dst[e]) in nodes)
        out.append(Subgraph(nodes, es))
    return g, out


def test_dedup_removes_exactly_the_isomorphic():
    rng = np.random.default_rng(4)
    shapes = [_random_labelled(rng, int(rng.integers(2, 5))) for _ in range(50)]
    shapes += [_permuted(rng, *shapes[int(rng.integers(50))]) for _ in range(50)]
    g, subs = _as_graph(shapes)
    dedup = Dedup(g)
    kept = [s for s in subs if dedup.add(s)]
    lab = {s: _labelled(g, s) for s in subs}
    for a, b in itertools.combinations(kept, 2):
        assert not _nx_iso(lab[a], lab[b])
    for s in subs:
        assert any(_nx_iso(lab[s], lab[k]) for k in kept)
    assert len(kept) < len(subs)


def test_orbits_match_networkx_automorphisms():
    rng = np.random.default_rng(5)
    for _ in range(40):
        labels, edges = _random_labelled(rng, int(rng.integers(2, 7)))
        h = _nx(labels, edges)
        gm = iso.MultiDiGraphMatcher(h, h, node_match=iso.categorical_node_match("label", None),
                                     edge_match=iso.categorical_multiedge_match("label", None))
        want: dict[int, set[int]] = {i: {i} for i in range(len(labels))}
        for m in gm.isomorphisms_iter():
            for i, j in m.items():
                want[i].add(j)
        got = orbits(labels, edges)
        assert sorted(map(sorted, {frozenset(v) for v in want.values()})) == got


def test_orbit_balancing_spreads_targets():
    # A star: one hub, three identical leaves: two orbits. Uniform over nodes would pick the hub 1/4
    # of the time; balanced over orbits, exactly half.
    star = (["o", "p", "p", "p"], [(1, 0, "r"), (2, 0, "r"), (3, 0, "r")])
    path = (["p", "o", "p", "o"], [(0, 1, "r"), (2, 1, "r"), (2, 3, "s")])  # all four positions distinct
    g, subs = _as_graph([star] * 40 + [path] * 40)
    bal, rng = TargetBalancer(g), np.random.default_rng(6)
    picks = [bal.pick(s, rng) - s.nodes[0] for s in subs]
    assert Counter(p == 0 for p in picks[:40]) == {True: 20, False: 20}
    assert Counter(picks[:40])[0] == 20 and all(Counter(picks[:40])[i] > 0 for i in (1, 2, 3))
    assert sorted(Counter(picks[40:]).values()) == [10, 10, 10, 10]
    # Restricting positions: only leaves allowed.
    leaf = bal.pick(subs[0], rng, allowed=lambda v: v != subs[0].nodes[0])
    assert leaf in subs[0].nodes[1:]


def test_dedup_on_sampled_walks(world):
    """The same check on real walks of the world (typed nodes, predicates, cycles from locality)."""
    g, rng = world, np.random.default_rng(7)
    subs = []
    for seed in rare_seeds(g, 30, rng).tolist():
        local = expand(g, seed, 0.4, 16, rng)
        subs += [s for k in (2, 3, 4, 5) for _ in range(3) if (s := random_walk(g, local, k, rng)) is not None]
    dedup = Dedup(g)
    kept = [s for s in subs if dedup.add(s)]
    lab = {s: _labelled(g, s) for s in subs}
    for a, b in itertools.combinations(kept, 2):
        assert not _nx_iso(lab[a], lab[b])
    for s in subs:
        assert any(_nx_iso(lab[s], lab[k]) for k in kept)
    assert 10 < len(kept) < len(subs)
