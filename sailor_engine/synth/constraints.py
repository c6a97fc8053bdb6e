"""Structured question constraints and their whole-graph evaluation (the authoritative form of a task).

A question is a tree of `Node`s rooted at the answer: each node constrains one entity (type, exact
name or initial, attribute ranges / categories, relation degree) and links to child nodes through
relations. `candidates(g, node)` returns the mask of every entity of the graph that satisfies the
tree, bottom-up with vectorised numpy over per-predicate edge lists, so uniqueness ("exactly one
entity satisfies it") is checked against the whole graph, never just the sampled subgraph.

Semantics (the tests' brute-force checker restates them independently):
- type: entity type equals; name: name equals; initial: name starts with it.
- Attr date/number: value present and lo <= value <= hi (None = unbounded); category: value equals.
- Link: the entity has an edge with a predicate in `predicates` to an entity satisfying `node`;
  direction "out": entity is the subject, "in": the object, "any": either.
- Degree: the entity has exactly `count` edges of `predicate` in that direction.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import numpy as np

from sailor_engine.synth.graph import MISSING, Graph


class Attr(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    attr: str
    kind: Literal["date", "number", "category"]
    lo: int | None = None
    hi: int | None = None
    value: str | None = None
    phrase: str = ""  # rendering of the value ("in the mid-1980s"); lo / hi / value are authoritative
    obfuscation: str = ""  # operator that produced it, "" when exact


class Degree(msgspec.Struct, forbid_unknown_fields=True):
    predicate: str
    direction: Literal["out", "in"]
    count: int


class Link(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    predicates: list[str]
    direction: Literal["out", "in", "any"]
    node: Node
    obfuscation: str = ""


class Node(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    type: str | None = None
    name: str | None = None
    initial: str | None = None
    descriptor: str | None = None  # head noun for text only ("a port"); its constraint is the category Attr
    attrs: list[Attr] = []
    links: list[Link] = []
    degree: Degree | None = None


class Checker:
    """Whole-graph evaluation of constraint trees, with per-graph lookup tables built once."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.n = g.num_entities
        self.by_name: dict[str, list[int]] = {}  # loaded graphs may repeat a name
        for i, name in enumerate(g.names):
            self.by_name.setdefault(name, []).append(i)
        self.first = np.array([ord(s[0]) if s else 0 for s in g.names], np.int64)
        self.pred_index = {r.name: k for k, r in enumerate(g.relations)}
        self.type_index = {t: k for k, t in enumerate(g.type_names)}
        self._deg: dict[tuple[int, str], np.ndarray] = {}

    def degree(self, pred: int, direction: str) -> np.ndarray:
        key = (pred, direction)
        if key not in self._deg:
            s, d = self.g.by_pred[pred]
            self._deg[key] = np.bincount(s if direction == "out" else d, minlength=self.n)
        return self._deg[key]

    def candidates(self, node: Node) -> np.ndarray:
        """[n] bool: entities satisfying `node` (and, recursively, its links)."""
        g, mask = self.g, np.ones(self.n, bool)
        if node.name is not None:
            mask[:] = False
            mask[self.by_name.get(node.name, [])] = True
        if node.type is not None:
            mask &= g.types == self.type_index.get(node.type, -1)
        if node.initial is not None:
            mask &= self.first == ord(node.initial)
        for a in node.attrs:
            mask &= self._attr_mask(a)
        if node.degree is not None:
            p = self.pred_index.get(node.degree.predicate)
            mask &= False if p is None else self.degree(p, node.degree.direction) == node.degree.count
        for link in node.links:
            mask &= self._link_mask(link)
        return mask

    def _attr_mask(self, a: Attr) -> np.ndarray:
        g = self.g
        if a.kind == "category":
            codes = g.categories.get(a.attr)
            if codes is None or a.value not in g.category_values[a.attr]:
                return np.zeros(self.n, bool)
            return codes == g.category_values[a.attr].index(a.value)
        v = (g.dates if a.kind == "date" else g.numbers).get(a.attr)
        if v is None:
            return np.zeros(self.n, bool)
        m = v != MISSING
        if a.lo is not None:
            m &= v >= a.lo
        if a.hi is not None:
            m &= v <= a.hi
        return m

    def _link_mask(self, link: Link) -> np.ndarray:
        child = self.candidates(link.node)
        out = np.zeros(self.n, bool)
        for name in link.predicates:
            p = self.pred_index.get(name)
            if p is None:
                continue
            s, d = self.g.by_pred[p]
            if link.direction in ("out", "any"):
                out[s[child[d]]] = True
            if link.direction in ("in", "any"):
                out[d[child[s]]] = True
        return out

    def count(self, node: Node) -> int:
        return int(self.candidates(node).sum())
