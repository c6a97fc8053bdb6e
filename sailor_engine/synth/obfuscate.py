"""Obfuscation operators: each turns an exact fact about an entity into a vaguer constraint it still meets.

Every operator only widens (the exact value stays inside the new constraint) or adds a fact that is
true of the entity, so the answer stays a solution; uniqueness is re-checked on the whole graph
afterwards (questions.py). The property tests drive each operator with hypothesis.

    vague_date(1984, rng)        -> Attr(lo=1984, hi=1986, phrase="in the mid-1980s")
    number_range(2340, rng)      -> Attr(lo=2000, hi=4999, phrase="between 2,000 and 5,000")
    partial_name("Talen Morvik") -> "T"            ("whose name begins with T")
    generic_descriptor(g, i)     -> category Attr  ("a painter", "a port")
    semantic_ambiguity(g, a, b)  -> every predicate between the two types, either direction
    structural(g, i, rng)        -> Degree         ("that created exactly 2 works")
    distractor_noise(g, i)       -> a true sentence about an entity outside the question
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from sailor_engine.synth.constraints import Attr, Degree
from sailor_engine.synth.graph import Graph
from sailor_engine.synth.phrasing import attr_clause, descriptor_noun

_PARTS = (("early", 0, 3), ("mid", 4, 6), ("late", 7, 9))
_CENTURY_PARTS = (("early", 0, 33), ("mid", 34, 66), ("late", 67, 99))


def exact_date(attr: str, year: int) -> Attr:
    return Attr(attr, "date", year, year, phrase=f"in {year}")


def vague_date(attr: str, year: int, rng: np.random.Generator) -> Attr:
    """A year -> part of its decade ("the mid-1980s"), or of its century for old dates ("the late 1700s")."""
    if year >= 1800 and rng.random() < 0.8:
        base, parts = year - year % 10, _PARTS
    else:
        base, parts = year - year % 100, _CENTURY_PARTS
    off = year - base
    word, lo, hi = next(p for p in parts if p[1] <= off <= p[2])
    era = f"{base}s" if base >= 0 else f"{-base}s BCE"
    return Attr(attr, "date", base + lo, base + hi, phrase=f"in the {word} {era}", obfuscation="vague_date")


def _fmt(n: int) -> str:
    return f"{n:,}"


def exact_number(attr: str, n: int) -> Attr:
    return Attr(attr, "number", n, n, phrase=_fmt(n))


def number_range(attr: str, n: int, rng: np.random.Generator) -> Attr:
    """A count -> a qualitative range on the 1-2-5 series ("fewer than 5,000", "at least 200")."""
    if n < 1:
        return Attr(attr, "number", None, 0, phrase="no", obfuscation="number_range")
    mag = 10 ** (len(str(n)) - 1)
    series = [mag * k for k in (1, 2, 5, 10)]
    lo = max(b for b in series if b <= n)
    hi = min(b for b in series if b > n)
    pick = int(rng.integers(3))
    if pick == 0:
        return Attr(attr, "number", None, hi - 1, phrase=f"fewer than {_fmt(hi)}", obfuscation="number_range")
    if pick == 1:
        return Attr(attr, "number", lo, None, phrase=f"at least {_fmt(lo)}", obfuscation="number_range")
    return Attr(attr, "number", lo, hi - 1, phrase=f"between {_fmt(lo)} and {_fmt(hi)}", obfuscation="number_range")


def category(attr: str, value: str) -> Attr:
    return Attr(attr, "category", value=value, phrase=value)


def partial_name(name: str) -> str:
    return name[0]


def generic_descriptor(g: Graph, i: int) -> Attr | None:
    """The entity's first category attribute, used as its head noun ("a port"); None if it has none."""
    for a, codes in g.categories.items():
        if codes[i] >= 0:
            value = g.category_values[a][codes[i]]
            return Attr(a, "category", value=value, phrase=descriptor_noun(a, value), obfuscation="generic_descriptor")
    return None


def semantic_ambiguity(g: Graph, type_a: str, type_b: str) -> list[str]:
    """Predicates that can link these two types in either direction (sorted)."""
    want = {(type_a, type_b), (type_b, type_a)}
    return sorted(rel.name for rel, pairs in zip(g.relations, g.predicate_types) if pairs & want)


def structural(g: Graph, i: int, rng: np.random.Generator,
               degree: Callable[[int, str], np.ndarray] | None = None) -> Degree | None:
    """Exactly how many edges of one of its predicates (chosen at random) the entity has.

    With `degree(pred, direction) -> [n] counts`, predicates whose count is the same for at least
    90% of the entity's type (every person is born somewhere exactly once) are skipped: they say nothing.
    """
    counts: dict[tuple[int, str], int] = {}
    for e, _, outgoing in g.edges_of(i):
        key = (int(g.pred[e]), "out" if outgoing else "in")
        counts[key] = counts.get(key, 0) + 1
    keys = sorted(counts)
    if degree is not None:
        same_type = g.types == g.types[i]
        keys = [k for k in keys if np.mean(degree(*k)[same_type] == counts[k]) < 0.9]
    if not keys:
        return None
    pred, direction = keys[int(rng.integers(len(keys)))]
    return Degree(g.relations[pred].name, direction, counts[pred, direction])


def distractor_noise(g: Graph, i: int, rng: np.random.Generator) -> str | None:
    """A true sentence about entity i (meant to be one outside the question: adds no constraint)."""
    facts = g.facts(i)
    if not facts:
        return None
    kind, attr, value = facts[int(rng.integers(len(facts)))]
    exact = exact_date(attr, value) if kind == "date" else exact_number(attr, value) if kind == "number" else category(attr, value)
    return f"Note: {g.names[i]} {attr_clause(exact)}."
