"""The synthetic world and the triples loader: schema, determinism, round trip, errors naming file:line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sailor_engine.synth.config import SynthConfig
from sailor_engine.synth.graph import ATTRIBUTES, MISSING, RELATIONS, TYPES, load_triples, synthetic_world, write_graph


@pytest.fixture(scope="module")
def world():
    return synthetic_world(SynthConfig(seed=1, num_entities=1500))


def test_world_schema(world):
    g = world
    assert g.num_entities == 1500 and len(set(g.names)) == 1500
    rel = {r.name: r for r in RELATIONS}
    for s, p, d in zip(g.src.tolist(), g.pred.tolist(), g.dst.tolist()):
        r = g.relations[p]
        assert s != d and g.type_of(s) == rel[r.name].subject_type and g.type_of(d) == rel[r.name].object_type
    keys = list(zip(g.src.tolist(), g.pred.tolist(), g.dst.tolist()))
    assert keys == sorted(set(keys))  # canonical: sorted, no duplicates
    for t, (date, number, cat) in ATTRIBUTES.items():
        members = np.flatnonzero(g.types == TYPES.index(t))
        years = g.dates[date[0]][members]
        assert ((years >= date[1][0]) & (years <= date[1][1])).all()
        if number is not None:
            assert (g.numbers[number[0]][members] != MISSING).all()
        assert (g.categories[cat[0]][members] >= 0).all()
    # Every person is born somewhere exactly once; popularity is uneven (rare seeds exist).
    born = g.by_pred[[r.name for r in g.relations].index("born_in")][0]
    assert sorted(born.tolist()) == np.flatnonzero(g.types == TYPES.index("person")).tolist()
    deg = g.degree()
    assert deg.max() >= 8 * np.median(deg) and (deg == 1).sum() > 100


def test_world_is_seeded():
    a, b, c = (synthetic_world(SynthConfig(seed=s, num_entities=300)) for s in (4, 4, 5))
    assert a.names == b.names and (a.src == b.src).all() and (a.dst == b.dst).all()
    assert a.names != c.names


def test_csr_matches_edges(world):
    g = world
    for i in range(0, g.num_entities, 37):
        got = sorted((e, j, out) for e, j, out in g.edges_of(i))
        want = sorted([(int(e), int(g.dst[e]), True) for e in np.flatnonzero(g.src == i)]
                      + [(int(e), int(g.src[e]), False) for e in np.flatnonzero(g.dst == i)])
        assert got == want


def test_write_then_load_round_trip(world, tmp_path):
    path = tmp_path / "graph.jsonl"
    write_graph(world, path)
    h = load_triples(path)

    def facts(g):
        ents = {g.ids[i]: (g.names[i], g.type_of(i), tuple(g.aliases[i]), tuple(sorted(g.facts(i))))
                for i in range(g.num_entities)}
        triples = {(g.ids[s], g.relations[p].name, g.ids[d]) for s, p, d in zip(g.src, g.pred, g.dst)}
        return ents, triples

    assert facts(world) == facts(h)
    # Known predicates keep their phrasing after a load.
    assert {r.name: r.forward for r in h.relations} == {r.name: r.forward for r in RELATIONS}


def _write(tmp_path, rows: list) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


E1 = {"id": "a", "type": "person", "name": "Ann"}
E2 = {"id": "b", "type": "place", "name": "Bay"}


@pytest.mark.parametrize("rows, line, words", [
    ([E1, "{not json"], 2, "malformed"),
    ([E1, {**E2, "colour": "red"}], 2, "colour"),
    ([E1, {**E2, "dates": {"founded": "1900"}}], 2, "dates"),
    ([E1, E2, {"id": "a", "type": "place", "name": "Dup"}], 3, "duplicate entity id 'a'"),
    ([E1, E2, {"subject": "a", "predicate": "born_in", "object": "zz"}], 3, "unknown entity 'zz'"),
    ([E1, E2, {"subject": "a", "predicate": "born_in"}], 3, "object"),
    ([{**E1, "dates": {"x": 1}}, {**E2, "numbers": {"x": 2}}], 2, "attribute 'x'"),
])
def test_loader_errors_name_file_and_line(tmp_path, rows, line, words):
    path = _write(tmp_path, rows)
    with pytest.raises(ValueError) as err:
        load_triples(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line}:") and words.lower() in msg.lower(), msg


def test_loader_generic_predicates(tmp_path):
    path = _write(tmp_path, [E1, E2, {"subject": "a", "predicate": "visited", "object": "b"},
                             {"subject": "a", "predicate": "born_in", "object": "b"}])
    g = load_triples(path)
    assert [r.name for r in g.relations] == ["born_in", "visited"]
    assert g.relations[1].forward == "has visited" and g.relations[0].forward == "was born in"
