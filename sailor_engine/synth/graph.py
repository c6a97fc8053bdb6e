"""Knowledge graph: typed entities with typed attributes and typed relations, in columnar arrays.

Two sources: `synthetic_world(cfg)`, a seeded generator of a plausible world (a few hundred to 100k+
entities), and `load_triples(path)`, a JSONL loader for real data (e.g. a Wikidata excerpt). Both
give a `Graph`, whose arrays make whole-graph constraint checks vectorised numpy (questions.py) and
whose CSR adjacency feeds the walks (sample.py). `write_graph` then `load_triples` gives the same
entities, facts and triples (type, predicate and category codes are renumbered in sorted order).

graph.jsonl, one record per line, entities before relations:
    {"id": "e12", "type": "person", "name": "Talen Morvik", "aliases": ["T. Morvik"],
     "dates": {"birth_year": 1984}, "numbers": {}, "categories": {"occupation": "painter"}}
    {"subject": "e12", "predicate": "works_for", "object": "e40"}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import msgspec
import numpy as np

from sailor_engine.synth import names
from sailor_engine.synth.config import SynthConfig

MISSING = np.iinfo(np.int64).min  # absent date / number; no real value is this small


class EntityRecord(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: str
    type: str
    name: str
    aliases: list[str] = []
    dates: dict[str, int] = {}  # years (negative = BCE)
    numbers: dict[str, int] = {}
    categories: dict[str, str] = {}


class TripleRecord(msgspec.Struct, forbid_unknown_fields=True):
    subject: str
    predicate: str
    object: str


@dataclass(frozen=True)
class Relation:
    """A predicate's schema and its phrasing (subject-first and object-first)."""

    name: str
    subject_type: str | None  # None: any type (loaded graphs)
    object_type: str | None
    forward: str  # "{s} works for {o}"
    inverse: str  # "{o} employs {s}"


# The synthetic world's schema. Real graphs get a generic Relation per unseen predicate.
TYPES = ("person", "organisation", "place", "work", "event")
TYPE_SHARE = (0.40, 0.15, 0.15, 0.15, 0.15)
RELATIONS = (
    Relation("born_in", "person", "place", "was born in", "is the birthplace of"),
    Relation("works_for", "person", "organisation", "works for", "employs"),
    Relation("created", "person", "work", "created", "was created by"),
    Relation("attended", "person", "event", "attended", "was attended by"),
    Relation("student_of", "person", "person", "studied under", "taught"),
    Relation("based_in", "organisation", "place", "is based in", "is home to"),
    Relation("founded_by", "organisation", "person", "was founded by", "founded"),
    Relation("published", "organisation", "work", "published", "was published by"),
    Relation("held_in", "event", "place", "was held in", "hosted"),
    Relation("organised_by", "event", "organisation", "was organised by", "organised"),
    Relation("set_in", "work", "place", "is set in", "is the setting of"),
)
# Per subject: (relation, mean count); mean 1 with `exactly_one` means every subject has one.
_RATES = {"born_in": 1.0, "works_for": 0.8, "created": 0.5, "attended": 0.4, "student_of": 0.25,
          "based_in": 1.0, "founded_by": 0.7, "published": 0.6, "held_in": 1.0, "organised_by": 0.7, "set_in": 0.5}
_EXACTLY_ONE = {"born_in", "based_in", "held_in"}
_LOCAL = {"works_for": 0.5, "founded_by": 0.5, "attended": 0.5}  # share kept in the subject's home place
# Attribute schema: type -> (date attr, (lo, hi)), (number attr, (log10 lo, log10 hi)), (category attr, values)
ATTRIBUTES = {
    "person": (("birth_year", (1900, 2005)), None, ("occupation", ("painter", "engineer", "poet", "physician", "architect", "composer", "chemist", "lawyer"))),
    "organisation": (("founded_year", (1850, 2020)), ("employees", (1.0, 5.3)), ("industry", ("shipping", "publishing", "mining", "software", "textiles", "banking", "brewing", "aviation"))),
    "place": (("founded_year", (800, 1950)), ("population", (2.7, 6.7)), ("kind", ("city", "town", "village", "port", "island"))),
    "work": (("published_year", (1850, 2023)), ("copies_sold", (3.0, 7.0)), ("genre", ("novel", "opera", "film", "poem", "symphony", "play"))),
    "event": (("year", (1900, 2023)), ("attendance", (2.0, 5.7)), ("kind", ("festival", "summit", "exhibition", "regatta", "congress"))),
}


@dataclass
class Graph:
    """Columnar graph. Entity i: ids[i], names[i], type_names[types[i]]; edge k: src[k] -pred[k]-> dst[k]."""

    ids: list[str]
    names: list[str]
    aliases: list[list[str]]
    types: np.ndarray  # [n] int8 index into type_names
    type_names: tuple[str, ...]
    dates: dict[str, np.ndarray]  # attr -> [n] int64, MISSING where absent
    numbers: dict[str, np.ndarray]  # attr -> [n] int64, MISSING where absent
    categories: dict[str, np.ndarray]  # attr -> [n] int32 code, -1 where absent
    category_values: dict[str, list[str]]  # attr -> code -> value
    relations: tuple[Relation, ...]
    src: np.ndarray  # [m] int32, edges sorted by (src, pred, dst), no duplicates
    pred: np.ndarray  # [m] int16 index into relations
    dst: np.ndarray  # [m] int32
    # Derived in __post_init__: undirected CSR for walks, per-predicate edge lists for checks.
    nbr_ptr: np.ndarray = field(init=False)  # [n+1]
    nbr: np.ndarray = field(init=False)  # [2m] neighbour of each half-edge
    nbr_edge: np.ndarray = field(init=False)  # [2m] edge index of each half-edge
    by_pred: list[tuple[np.ndarray, np.ndarray]] = field(init=False)  # pred -> (src, dst)
    index: dict[str, int] = field(init=False)  # entity id -> position

    def __post_init__(self) -> None:
        n = len(self.ids)
        ends = np.concatenate([self.src, self.dst]).astype(np.int64)
        other = np.concatenate([self.dst, self.src]).astype(np.int32)
        edge = np.concatenate([np.arange(len(self.src))] * 2).astype(np.int32)
        order = np.lexsort((other, ends))
        self.nbr, self.nbr_edge = other[order], edge[order]
        self.nbr_ptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(ends, minlength=n), out=self.nbr_ptr[1:])
        self.by_pred = [(self.src[self.pred == r], self.dst[self.pred == r]) for r in range(len(self.relations))]
        self.index = {e: i for i, e in enumerate(self.ids)}

    @property
    def num_entities(self) -> int:
        return len(self.ids)

    def degree(self) -> np.ndarray:
        return np.diff(self.nbr_ptr)

    @cached_property
    def predicate_types(self) -> list[set[tuple[str, str]]]:
        """Per predicate, the (subject type, object type) pairs it links: the schema's, else the data's."""
        out = []
        for k, rel in enumerate(self.relations):
            if rel.subject_type is not None:
                out.append({(rel.subject_type, rel.object_type)})
                continue
            s, d = self.by_pred[k]
            pairs = set(zip(self.types[s].tolist(), self.types[d].tolist()))
            out.append({(self.type_names[x], self.type_names[y]) for x, y in pairs})
        return out

    def type_of(self, i: int) -> str:
        return self.type_names[self.types[i]]

    def facts(self, i: int) -> list[tuple[str, str, object]]:
        """(kind, attr, value) of entity i: kind in date / number / category."""
        out: list[tuple[str, str, object]] = []
        for kind, table in (("date", self.dates), ("number", self.numbers)):
            out += [(kind, a, int(v[i])) for a, v in table.items() if v[i] != MISSING]
        out += [("category", a, self.category_values[a][v[i]]) for a, v in self.categories.items() if v[i] >= 0]
        return out

    def edges_of(self, i: int) -> list[tuple[int, int, bool]]:
        """(edge index, neighbour, outgoing) for every relation of entity i, in edge order."""
        lo, hi = self.nbr_ptr[i], self.nbr_ptr[i + 1]
        return [(int(k), int(j), int(self.src[k]) == i) for j, k in zip(self.nbr[lo:hi], self.nbr_edge[lo:hi])]


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return np.round(10.0 ** rng.uniform(lo, hi, n)).astype(np.int64)


def synthetic_world(cfg: SynthConfig) -> Graph:
    """A seeded world: unique syllable names, Zipf-ish popularity (rare seeds exist), typed facts."""
    rng = np.random.default_rng([cfg.seed, 1])
    n = cfg.num_entities
    types = np.repeat(np.arange(len(TYPES), dtype=np.int8), np.floor(np.array(TYPE_SHARE) * n).astype(int))
    types = np.concatenate([types, np.zeros(n - len(types), np.int8)])  # remainder: persons
    entity_names, aliases = names.make_names([TYPES[t] for t in types], rng)
    dates, numbers, categories, category_values = {}, {}, {}, {}
    for t, (date, number, cat) in ATTRIBUTES.items():
        mask = types == TYPES.index(t)
        k = int(mask.sum())
        dates.setdefault(date[0], np.full(n, MISSING, np.int64))[mask] = rng.integers(date[1][0], date[1][1] + 1, k)
        if number is not None:
            numbers.setdefault(number[0], np.full(n, MISSING, np.int64))[mask] = _log_uniform(rng, *number[1], k)
        values = category_values.setdefault(cat[0], [])
        values += [v for v in cat[1] if v not in values]
        codes = np.array([values.index(v) for v in cat[1]], np.int32)
        categories.setdefault(cat[0], np.full(n, -1, np.int32))[mask] = codes[rng.integers(0, len(cat[1]), k)]
    # Popularity: within each type a Zipf-ish weight on a random rank, so objects are drawn unevenly.
    members = {t: np.flatnonzero(types == i) for i, t in enumerate(TYPES)}
    weight = {t: 1.0 / (1.0 + rng.permutation(len(m))) ** 0.6 for t, m in members.items()}
    scale = cfg.mean_degree / 3.0  # the default rates give ~3 relations per entity
    src, pred, dst = [], [], []
    for r, rel in enumerate(RELATIONS):
        subj, objs = members[rel.subject_type], members[rel.object_type]
        if rel.name in _EXACTLY_ONE:
            s = subj
        else:
            s = np.repeat(subj, rng.poisson(_RATES[rel.name] * scale, len(subj)))
        p = weight[rel.object_type] / weight[rel.object_type].sum()
        src.append(s)
        dst.append(objs[rng.choice(len(objs), size=len(s), p=p)])
        pred.append(np.full(len(s), r))
    _localise(types, src, dst, rng)
    return make_graph([f"e{i}" for i in range(n)], entity_names, aliases, types, TYPES, dates, numbers,
                      categories, category_values, RELATIONS, np.concatenate(src), np.concatenate(pred),
                      np.concatenate(dst))


def _localise(types: np.ndarray, src: list[np.ndarray], dst: list[np.ndarray], rng: np.random.Generator) -> None:
    """Rewire a share of some relations to stay in one place: people work for, found and attend what is
    in their home town. This closes triangles (person - organisation - place), the short cycles and
    dense links V2's expansion looks for, which independent random edges almost never form."""
    home = np.full(len(types), -1, np.int64)  # birthplace / seat / venue: the exactly-one place relations
    names = [r.name for r in RELATIONS]
    for r in (names.index(x) for x in sorted(_EXACTLY_ONE)):
        home[src[r]] = dst[r]
    for r in (names.index(x) for x in sorted(_LOCAL)):
        obj_type = TYPES.index(RELATIONS[r].object_type)
        objs = np.flatnonzero((types == obj_type) & (home >= 0))
        objs = objs[np.argsort(home[objs], kind="stable")]
        lo = np.searchsorted(home[objs], home[src[r]], "left")
        hi = np.searchsorted(home[objs], home[src[r]], "right")
        move = (rng.random(len(src[r])) < _LOCAL[RELATIONS[r].name]) & (hi > lo) & (home[src[r]] >= 0)
        pick = lo + (rng.random(len(src[r])) * (hi - lo)).astype(np.int64)
        dst[r] = np.where(move, objs[np.minimum(pick, len(objs) - 1)], dst[r])


def make_graph(ids, entity_names, aliases, types, type_names, dates, numbers, categories, category_values,
               relations, src, pred, dst) -> Graph:
    """Canonicalise edges (drop self-loops and duplicates, sort by (src, pred, dst)) and build the Graph."""
    src, pred, dst = (np.asarray(a, np.int64) for a in (src, pred, dst))
    keep = src != dst
    key = np.unique((src[keep] * len(relations) + pred[keep]) * len(ids) + dst[keep])
    sp, d = np.divmod(key, len(ids))
    s, p = np.divmod(sp, len(relations))
    return Graph(list(ids), list(entity_names), [list(a) for a in aliases], np.asarray(types, np.int8),
                 tuple(type_names), dates, numbers, categories, category_values, tuple(relations),
                 s.astype(np.int32), p.astype(np.int16), d.astype(np.int32))


# ---------------------------------------------------------------------------------------- file format

def entity_records(g: Graph) -> list[EntityRecord]:
    out = []
    for i in range(g.num_entities):
        rec = EntityRecord(g.ids[i], g.type_of(i), g.names[i], list(g.aliases[i]))
        for kind, attr, value in g.facts(i):
            {"date": rec.dates, "number": rec.numbers, "category": rec.categories}[kind][attr] = value
        out.append(rec)
    return out


def write_graph(g: Graph, path: Path) -> None:
    enc = msgspec.json.Encoder()
    with open(path, "wb") as f:
        for rec in entity_records(g):
            f.write(enc.encode(rec) + b"\n")
        for s, p, d in zip(g.src.tolist(), g.pred.tolist(), g.dst.tolist()):
            f.write(enc.encode(TripleRecord(g.ids[s], g.relations[p].name, g.ids[d])) + b"\n")


def _generic_relation(name: str) -> Relation:
    words = name.replace("_", " ")
    return Relation(name, None, None, f"has {words}", f"is the {words} of")


def load_triples(path: str | Path) -> Graph:
    """Load graph.jsonl (entities, then or among them {subject, predicate, object} rows).

    Every error names the file and line: malformed JSON, unknown fields, wrong types, a duplicate id,
    a triple naming an unknown entity, an attribute with two kinds.
    """
    path = Path(path)
    entity_dec, triple_dec = msgspec.json.Decoder(EntityRecord), msgspec.json.Decoder(TripleRecord)
    entities: list[EntityRecord] = []
    entity_lines: list[int] = []
    triples: list[tuple[int, TripleRecord]] = []
    index: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                if b'"subject"' in line:
                    triples.append((lineno, triple_dec.decode(line)))
                    continue
                rec = entity_dec.decode(line)
            except msgspec.DecodeError as e:
                raise ValueError(f"{where}: {e}") from None
            if rec.id in index:
                raise ValueError(f"{where}: duplicate entity id {rec.id!r}")
            index[rec.id] = len(entities)
            entities.append(rec)
            entity_lines.append(lineno)
    n = len(entities)
    if n == 0:
        raise ValueError(f"{path}: no entity records")
    type_names = tuple(sorted({e.type for e in entities}))
    kinds: dict[str, str] = {}
    for lineno, e in zip(entity_lines, entities):
        for kind, table in (("date", e.dates), ("number", e.numbers), ("category", e.categories)):
            for attr in table:
                if kinds.setdefault(attr, kind) != kind:
                    raise ValueError(f"{path}:{lineno}: attribute {attr!r} is a {kind} here "
                                     f"but a {kinds[attr]} on an earlier line")
    dates = {a: np.full(n, MISSING, np.int64) for a, k in sorted(kinds.items()) if k == "date"}
    numbers = {a: np.full(n, MISSING, np.int64) for a, k in sorted(kinds.items()) if k == "number"}
    categories = {a: np.full(n, -1, np.int32) for a, k in sorted(kinds.items()) if k == "category"}
    values = {a: sorted({e.categories[a] for e in entities if a in e.categories}) for a in categories}
    codes = {a: {v: c for c, v in enumerate(vs)} for a, vs in values.items()}
    for i, e in enumerate(entities):
        for a, v in e.dates.items():
            dates[a][i] = v
        for a, v in e.numbers.items():
            numbers[a][i] = v
        for a, v in e.categories.items():
            categories[a][i] = codes[a][v]
    known = {r.name: r for r in RELATIONS}
    preds = sorted({t.predicate for _, t in triples})
    relations = tuple(known.get(p) or _generic_relation(p) for p in preds)
    pred_index = {p: k for k, p in enumerate(preds)}
    src, pred, dst = (np.empty(len(triples), np.int64) for _ in range(3))
    for k, (lineno, t) in enumerate(triples):
        for end in (t.subject, t.object):
            if end not in index:
                raise ValueError(f"{path}:{lineno}: triple names unknown entity {end!r}")
        src[k], pred[k], dst[k] = index[t.subject], pred_index[t.predicate], index[t.object]
    types = np.array([type_names.index(e.type) for e in entities], np.int8)
    return make_graph([e.id for e in entities], [e.name for e in entities], [e.aliases for e in entities],
                      types, type_names, dates, numbers, categories, values, relations, src, pred, dst)
