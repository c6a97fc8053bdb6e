"""Property tests: every obfuscation operator keeps the true answer inside the constraint it writes,
checked by plain comparisons restated here, and over built questions by the whole-graph Checker."""

from __future__ import annotations

import re

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sailor_engine.synth import obfuscate as ob
from sailor_engine.synth.config import ObfuscationConfig, SynthConfig
from sailor_engine.synth.constraints import Checker, Link, Node
from sailor_engine.synth.graph import synthetic_world
from sailor_engine.synth.questions import build_question, render
from sailor_engine.synth.sample import Subgraph

G = synthetic_world(SynthConfig(seed=9, num_entities=600))
CHECK = Checker(G)
ENTITY = st.integers(0, G.num_entities - 1)
SEED = st.integers(0, 2**32 - 1)


def _inside(a, value: int) -> bool:
    return (a.lo is None or a.lo <= value) and (a.hi is None or value <= a.hi)


@given(st.integers(-3000, 2100), SEED)
def test_vague_date_contains_the_year(year, seed):
    a = ob.vague_date("year", year, np.random.default_rng(seed))
    assert _inside(a, year) and a.obfuscation == "vague_date"
    assert 2 <= a.hi - a.lo + 1 <= 34  # a part of a decade or of a century, never the exact year
    m = re.fullmatch(r"in the (early|mid|late) (\d+)s( BCE)?", a.phrase)
    assert m, a.phrase


@given(st.integers(0, 10**12), SEED)
def test_number_range_contains_the_number(n, seed):
    a = ob.number_range("population", n, np.random.default_rng(seed))
    assert _inside(a, n) and a.phrase
    for word in re.findall(r"[\d,]+\d", a.phrase):
        bound = int(word.replace(",", ""))
        assert bound in (a.lo, (a.hi or 0) + 1)  # the text states the structured bounds


@given(ENTITY)
def test_partial_name_and_descriptor_keep_the_entity(i):
    assert G.names[i].startswith(ob.partial_name(G.names[i]))
    d = ob.generic_descriptor(G, i)
    assert d is not None and d.value in {v for kind, _, v in G.facts(i) if kind == "category"}
    node = Node(type=G.type_of(i), initial=ob.partial_name(G.names[i]), descriptor=d.value, attrs=[d])
    assert CHECK.candidates(node)[i]


@given(st.integers(0, len(G.src) - 1))
def test_semantic_ambiguity_widens(e):
    s, d = int(G.src[e]), int(G.dst[e])
    preds = ob.semantic_ambiguity(G, G.type_of(s), G.type_of(d))
    assert G.relations[G.pred[e]].name in preds
    # Either end still finds the other through the widened link, in any direction.
    assert CHECK.candidates(Node(links=[Link(preds, "any", Node(name=G.names[d]))]))[s]
    assert CHECK.candidates(Node(links=[Link(preds, "any", Node(name=G.names[s]))]))[d]


@given(ENTITY, SEED)
def test_structural_states_a_true_degree(i, seed):
    deg = ob.structural(G, i, np.random.default_rng(seed))
    if deg is None:
        assert not G.edges_of(i)
        return
    side = G.src if deg.direction == "out" else G.dst
    count = int(((side == i) & (G.pred == [r.name for r in G.relations].index(deg.predicate))).sum())
    assert count == deg.count and CHECK.candidates(Node(degree=deg))[i]


@given(ENTITY, SEED)
def test_distractor_noise_is_true(i, seed):
    text = ob.distractor_noise(G, i, np.random.default_rng(seed))
    assert text.startswith(f"Note: {G.names[i]} ")
    values = [str(v) if kind != "number" else f"{v:,}" for kind, _, v in G.facts(i)]
    assert any(v in text for v in values)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, len(G.src) - 1), st.sampled_from([1, 3]), SEED,
       st.floats(0, 1), st.floats(0, 1), st.floats(0, 1))
def test_built_questions_keep_their_answer(e, level, seed, p_date, p_number, p_name):
    """Whatever the operator mix, a built question is satisfied by its target and by nothing else."""
    s, d = int(G.src[e]), int(G.dst[e])
    sub = Subgraph(tuple(sorted({s, d})), (e,))
    obf = ObfuscationConfig(vague_date=p_date, number_range=p_number, partial_name=p_name,
                            generic_descriptor=1 - p_name, semantic_ambiguity=0.5, structural=0.5)
    cfg = SynthConfig(obfuscation=obf)
    built = build_question(G, CHECK, sub, s, level, cfg, np.random.default_rng(seed))
    if built is None:
        return
    root, hops, _ = built
    assert hops == 1 and np.flatnonzero(CHECK.candidates(root)).tolist() == [s]
    assert G.names[s] not in render(G, root, [])


def test_examples():
    seen = {(a.lo, a.hi, a.phrase) for a in (ob.vague_date("y", 1984, np.random.default_rng(k)) for k in range(40))}
    assert seen == {(1984, 1986, "in the mid 1980s"), (1967, 1999, "in the late 1900s")}
    seen = {(a.lo, a.hi, a.phrase) for a in (ob.number_range("n", 2340, np.random.default_rng(k)) for k in range(40))}
    assert seen == {(None, 4999, "fewer than 5,000"), (2000, None, "at least 2,000"),
                    (2000, 4999, "between 2,000 and 5,000")}
