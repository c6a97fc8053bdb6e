"""Questions from subgraphs: a constraint tree rooted at the target, obfuscated, made unique, rendered.

`build_question` turns (subgraph, target, level) into a constraint tree (constraints.Node): a BFS
spanning tree of the subgraph rooted at the target, leaves as anchors. Levels:
  1: one hop from a named anchor (the answer is reachable directly);
  2: two or more hops, every anchor named (multi-hop, clear path);
  3: at least one anchor obfuscated (initial or generic descriptor): no clear path, the answer
     comes from intersecting vague constraints.
From level 2 on, a relation may be made ambiguous ("is linked to": any predicate between the two
types, either direction).
Attribute constraints (vague dates, number ranges, categories) are then added, one at a time, until
exactly one entity of the whole graph satisfies the tree; a question that cannot be made unique is
dropped. `render` writes the text from the tree; an optional rewrite hook may rephrase it, but the
tree stays authoritative (tasks carry it, and any tool can re-verify it against graph.jsonl).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import msgspec
import numpy as np

from sailor_engine.synth import obfuscate as ob
from sailor_engine.synth.config import SynthConfig
from sailor_engine.synth.constraints import Checker, Link, Node
from sailor_engine.synth.graph import Graph, Relation
from sailor_engine.synth.phrasing import PLURAL, article, attr_clause, relation_phrase
from sailor_engine.synth.sample import Subgraph


class Task(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    question: str
    answer: str
    aliases: list[str]
    answer_id: str
    level: int
    hops: int
    obfuscations: list[str]
    constraints: Node
    entities: list[str]  # the subgraph's entity ids
    evidence: list[str]  # page urls of the subgraph's entities (provenance)
    noise: list[str] = []  # distractor sentences appended to the question (no constraint)


Rewrite = Callable[[str, Task], str]  # (question text, task) -> new text; e.g. an LLM paraphrase


def bfs_tree(g: Graph, sub: Subgraph, root: int) -> tuple[dict[int, list[tuple[int, int]]], dict[int, int]]:
    """children[v] = [(edge, child)], depth[v], of a BFS spanning tree of the subgraph from root."""
    adj: dict[int, list[tuple[int, int]]] = {v: [] for v in sub.nodes}
    for e in sub.edges:
        s, d = int(g.src[e]), int(g.dst[e])
        adj[s].append((e, d))
        adj[d].append((e, s))
    children: dict[int, list[tuple[int, int]]] = {v: [] for v in sub.nodes}
    depth, queue = {root: 0}, deque([root])
    while queue:
        u = queue.popleft()
        for e, v in adj[u]:
            if v not in depth:
                depth[v] = depth[u] + 1
                children[u].append((e, v))
                queue.append(v)
    return children, depth


def _wants(p: float, rng: np.random.Generator) -> bool:
    return p > 0 and rng.random() < p


def _attr_for(kind: str, attr: str, value, cfg: SynthConfig, rng: np.random.Generator):
    o = cfg.obfuscation
    if kind == "date":
        return ob.vague_date(attr, value, rng) if _wants(o.vague_date, rng) else ob.exact_date(attr, value)
    if kind == "number":
        return ob.number_range(attr, value, rng) if _wants(o.number_range, rng) else ob.exact_number(attr, value)
    return ob.category(attr, value)


def build_question(g: Graph, checker: Checker, sub: Subgraph, target: int, level: int, cfg: SynthConfig,
                   rng: np.random.Generator) -> tuple[Node, int, list[int]] | None:
    """(constraint tree, hops, nodes that got a Node) with exactly one solution, the target; or None."""
    children, depth = bfs_tree(g, sub, target)
    hops = max(depth.values())
    nodes: dict[int, Node] = {v: Node(type=g.type_of(v)) for v in sub.nodes}
    leaves = [v for v in sub.nodes if v != target and not children[v]]
    obscured = set()
    if level == 3 and leaves:
        forced = leaves[int(rng.integers(len(leaves)))]
        p = max(cfg.obfuscation.partial_name, cfg.obfuscation.generic_descriptor)
        obscured = {v for v in leaves if v == forced or _wants(p, rng)}
    for v in leaves:
        if v not in obscured:
            nodes[v].name = g.names[v]
            continue
        desc = ob.generic_descriptor(g, v)
        pn, gd = cfg.obfuscation.partial_name, cfg.obfuscation.generic_descriptor
        if desc is not None and rng.random() * (pn + gd) < gd:
            nodes[v].descriptor, nodes[v].attrs = desc.phrase, [desc]
        else:
            nodes[v].initial = ob.partial_name(g.names[v])
    for u in sub.nodes:
        for e, v in children[u]:
            rel = g.relations[g.pred[e]]
            link = Link([rel.name], "out" if int(g.src[e]) == u else "in", nodes[v])
            if level >= 2 and _wants(cfg.obfuscation.semantic_ambiguity, rng):
                preds = ob.semantic_ambiguity(g, g.type_of(u), g.type_of(v))
                link.predicates, link.direction, link.obfuscation = preds, "any", "semantic_ambiguity"
            nodes[u].links.append(link)
    root = nodes[target]
    if not _make_unique(g, checker, nodes, target, cfg, rng):
        return None
    if root.degree is None and _wants(cfg.obfuscation.structural, rng):
        root.degree = ob.structural(g, target, rng, checker.degree)
    return root, hops, list(sub.nodes)


def _make_unique(g: Graph, checker: Checker, nodes: dict[int, Node], target: int, cfg: SynthConfig,
                 rng: np.random.Generator) -> bool:
    """Add attribute constraints (target first, half the time) until one entity is left."""
    root = nodes[target]
    mask = checker.candidates(root)
    assert mask[target], "constraint tree lost its own target"
    while mask.sum() > 1:
        options = []
        for v, node in nodes.items():
            if node.name is not None or len(node.attrs) >= cfg.max_constraints:
                continue
            used = {a.attr for a in node.attrs}
            options += [(v, f) for f in g.facts(v) if f[1] not in used]
        if not options:
            if root.degree is not None:
                return False
            root.degree = ob.structural(g, target, rng, checker.degree)
            if root.degree is None:
                return False
        else:
            on_target = [o for o in options if o[0] == target]
            pool = on_target if on_target and rng.random() < 0.5 else options
            v, (kind, attr, value) = pool[int(rng.integers(len(pool)))]
            nodes[v].attrs.append(_attr_for(kind, attr, value, cfg, rng))
        mask = checker.candidates(root)
        assert mask[target], "an obfuscation excluded the answer"
    return True


def obfuscations(node: Node, noise: list[str]) -> list[str]:
    """Sorted distinct operators used anywhere in the tree."""
    out = {"distractor_noise"} if noise else set()
    stack = [node]
    while stack:
        n = stack.pop()
        out |= {a.obfuscation for a in n.attrs if a.obfuscation}
        if n.initial is not None:
            out.add("partial_name")
        if n.degree is not None:
            out.add("structural")
        for link in n.links:
            if link.obfuscation:
                out.add(link.obfuscation)
            stack.append(link.node)
    return sorted(out)


# --------------------------------------------------------------------------------------- rendering

def _clauses(g: Graph, node: Node, rels: dict[str, Relation]) -> list[str]:
    out = []
    if node.initial is not None:
        out.append(f"whose name begins with {node.initial}")
    out += [attr_clause(a) for a in node.attrs if a.obfuscation != "generic_descriptor"]
    if node.degree is not None:
        rel = rels[node.degree.predicate]
        other = rel.object_type if node.degree.direction == "out" else rel.subject_type
        noun = other or "entity"
        noun = noun if node.degree.count == 1 else PLURAL.get(noun, noun + "s")
        out.append(f"{relation_phrase(rel, node.degree.direction)} exactly {node.degree.count} {noun}")
    for link in node.links:
        verb = "is linked to" if link.direction == "any" else relation_phrase(rels[link.predicates[0]], link.direction)
        out.append(f"{verb} {_noun_phrase(g, link.node, rels)}")
    return out


def _and(clauses: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]


def _noun_phrase(g: Graph, node: Node, rels: dict[str, Relation]) -> str:
    if node.name is not None:
        return node.name
    head = node.descriptor or node.type or "entity"
    clauses = _clauses(g, node, rels)
    if not clauses:
        return article(head)
    pron = "who" if node.type == "person" else "that"
    # "whose ..." is its own relative pronoun: "a person whose name begins with S and founded X".
    text = f"{article(head)} " + ("" if clauses[0].startswith("whose") else f"{pron} ") + _and(clauses)
    return f"({text})" if len(clauses) > 1 else text


def render(g: Graph, root: Node, noise: list[str]) -> str:
    rels = {r.name: r for r in g.relations}
    text = f"Which {root.type or 'entity'} {_and(_clauses(g, root, rels))}?"
    return " ".join([text, *noise])
