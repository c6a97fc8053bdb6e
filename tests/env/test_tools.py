"""The offline web: search recall on the synthetic world, visit evidence, and clear observations for
unknown urls and malformed arguments (never an exception)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sailor_engine.env.tools import SEPARATOR, OfflineWeb, Page, SearchArgs, SearchTool, VisitArgs, VisitTool, call_tool
from sailor_engine.synth.config import SynthConfig
from sailor_engine.synth.corpus import build_corpus, entity_urls
from sailor_engine.synth.graph import synthetic_world


@pytest.fixture(scope="module")
def world():
    cfg = SynthConfig(seed=11, num_entities=3000)
    g = synthetic_world(cfg)
    pages = build_corpus(g, cfg.distractor_pages, np.random.default_rng(0))
    return g, entity_urls(g), OfflineWeb(pages, top_k=3)


def run(coro):
    return asyncio.run(coro)


def test_search_finds_named_entity_in_top3(world):
    g, urls, web = world
    ranked = web.rank(g.names, k=3)
    hits = np.mean([urls[i] in {web.pages[j].url for j in r} for i, r in enumerate(ranked)])
    assert hits >= 0.95, hits
    # Embedded in a longer query too ("<name> birthplace"): the name still brings its page up.
    sample = range(0, g.num_entities, 10)
    ranked = web.rank([f"{g.names[i]} birthplace" for i in sample], k=3)
    assert np.mean([urls[i] in {web.pages[j].url for j in r} for i, r in zip(sample, ranked)]) >= 0.9


def test_search_observation_format(world):
    g, urls, web = world
    out = run(call_tool(SearchTool(web), {"query": [g.names[0], "qqqzzz"]}))
    first, second = out.split(SEPARATOR)
    assert first.startswith(f"Results for '{g.names[0]}':\n1. {g.names[0]}\n{urls[0]}\n")
    assert first.count("\n") == 3 * 3  # header + 3 results of 3 lines
    assert second == "No results for 'qqqzzz'."


def test_visit_gives_goal_evidence(world):
    g, urls, web = world
    i = next(k for k in range(g.num_entities) if g.type_of(k) == "person")
    born = next(g.names[j] for e, j, out in g.edges_of(i) if out and g.relations[g.pred[e]].name == "born_in")
    out = run(call_tool(VisitTool(web), {"url": [urls[i]], "goal": f"{g.names[i]} was born in"}))
    assert out.startswith(f"Page: {g.names[i]}\n{urls[i]}\nEvidence:\n")
    assert f"{g.names[i]} was born in {born}." in out and out.split("\n")[-1].startswith("Summary: ")


def test_unknown_url_is_a_clear_observation(world):
    _, urls, web = world
    out = run(call_tool(VisitTool(web), {"url": ["wiki://no_such_page", urls[1]], "goal": "x"}))
    missing, found = out.split(SEPARATOR)
    assert missing == "Page not found: wiki://no_such_page. Only urls from search results can be visited."
    assert found.startswith("Page: ")


@pytest.mark.parametrize("tool, args, words", [
    ("search", {}, "missing required field `query`"),
    ("search", {"query": "just a string"}, "expected `array`"),
    ("search", {"query": []}, "length >= 1"),
    ("search", {"query": ["a"] * 9}, "length <= 8"),
    ("search", {"query": [1]}, "expected `str`"),
    ("search", {"query": ["a"], "top": 3}, "unknown field `top`"),
    ("search", ["a"], "expected `object`"),
    ("visit", {"url": ["wiki://x"]}, "missing required field `goal`"),
    ("visit", {"url": "wiki://x", "goal": "g"}, "expected `array`"),
])
def test_malformed_arguments_are_clear_observations(world, tool, args, words):
    _, _, web = world
    t = SearchTool(web) if tool == "search" else VisitTool(web)
    out = run(call_tool(t, args))
    assert out.startswith(f"Invalid arguments for {tool}: ") and words.lower() in out.lower(), out
    assert t.description in out  # the observation says what is expected


def test_tools_follow_the_protocol(world):
    _, _, web = world
    for t, args_type in ((SearchTool(web), SearchArgs), (VisitTool(web), VisitArgs)):
        assert isinstance(t.name, str) and t.description and t.args_type is args_type
        assert asyncio.iscoroutinefunction(t.__call__)


def test_index_save_load_round_trip(world, tmp_path):
    g, _, web = world
    web.save(tmp_path / "index")
    again = OfflineWeb.load(tmp_path / "index", web.pages, top_k=3)
    queries = g.names[:200]
    assert again.rank(queries) == web.rank(queries)


def test_exact_title_beats_longer_pages():
    pages = [Page("wiki://casen_briha", "Casen Briha", "Casen Briha was born in Casen.\nCasen Briha works for Casen Group."),
             Page("wiki://casen", "Casen", "Casen is a place.\nCasen is a town.")]
    web = OfflineWeb(pages, top_k=2)
    assert web.rank(["Casen"]) == [[1, 0]] and web.rank(["casen  BRIHA"])[0][0] == 0
    with pytest.raises(ValueError, match="at least one page"):
        OfflineWeb([])


def test_evidence_selection_and_summary():
    page = Page("wiki://ann", "Ann Lee", "Ann Lee is a person.\nAnn Lee was born in 1950.\nAnn Lee works for Acme.\n"
                                         "Ann Lee was born in Bay.\nAnn Lee is the author of Sea.")
    web = OfflineWeb([page])
    # Function words and the page's own name do not count: "the"/"of"/"is" would match half the page.
    assert web.visit(["wiki://ann"], "Ann Lee works for") == "Page: Ann Lee\nwiki://ann\nEvidence:\nAnn Lee works for Acme."
    out = web.visit(["wiki://ann"], "where was Ann Lee born")
    assert out.split("\n")[3:] == ["Ann Lee was born in 1950.", "Ann Lee was born in Bay.", "Summary: Ann Lee was born in 1950."]
    # Nothing in common with the goal: the page's opening lines.
    assert web.visit(["wiki://ann"], "zzz").split("\n")[3:6] == page.text.split("\n")[:3]
