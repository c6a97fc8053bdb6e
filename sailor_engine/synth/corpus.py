"""Pages of the offline web, rendered from the knowledge graph: one per entity, plus distractors.

An entity page states every fact of the entity, one statement per line, with the same phrasing the
questions use ("Talen Morvik was born in 1984.", "Dravon Group employs Talen Morvik and Ori Kel."),
and links to its neighbours' pages. Relations are stated on both ends, so a question can be solved
from either side. A hub lists at most `MAX_LISTED` neighbours per relation (pages stay short; the
expert drops questions whose path runs through an unlisted one). Distractor pages carry near-miss
names and no facts of the graph.
"""

from __future__ import annotations

import re

import numpy as np

from sailor_engine.env.tools import Page
from sailor_engine.synth import obfuscate as ob
from sailor_engine.synth.graph import Graph
from sailor_engine.synth.phrasing import article, attr_clause

ROOT = "wiki://"  # short: urls are copied token by token from search results into visit calls
MAX_LISTED = 8


def url_for(name: str) -> str:
    return ROOT + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def entity_urls(g: Graph) -> list[str]:
    """Page url per entity; a slug shared by two names (loaded graphs) gets a numeric suffix."""
    seen: dict[str, int] = {}
    out = []
    for name in g.names:
        url = url_for(name)
        seen[url] = seen.get(url, 0) + 1
        out.append(url if seen[url] == 1 else f"{url}_{seen[url]}")
    return out


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def entity_page(g: Graph, i: int, urls: list[str]) -> Page:
    name = g.names[i]
    lines = [f"{name} is {article(g.type_of(i))}."]
    for kind, attr, value in g.facts(i):
        a = (ob.exact_date(attr, value) if kind == "date" else ob.exact_number(attr, value) if kind == "number"
             else ob.category(attr, value))
        lines.append(f"{name} {attr_clause(a)}.")
    groups: dict[tuple[int, bool], list[int]] = {}
    for e, j, outgoing in g.edges_of(i):
        groups.setdefault((int(g.pred[e]), outgoing), []).append(j)
    links = []
    for (p, outgoing), others in sorted(groups.items()):
        rel = g.relations[p]
        listed = [g.names[j] for j in others[:MAX_LISTED]]
        if len(others) > MAX_LISTED:
            listed.append(f"{len(others) - MAX_LISTED} others")
        lines.append(f"{name} {rel.forward if outgoing else rel.inverse} {_join(listed)}.")
        links += [urls[j] for j in others[:MAX_LISTED]]
    return Page(urls[i], name, "\n".join(lines), links)


def _near_miss(name: str, rng: np.random.Generator) -> str:
    """Change one vowel of the name ("Talen Morvik" -> "Talen Murvik")."""
    spots = [k for k, c in enumerate(name) if c in "aeiou"]
    if not spots:
        return name + "e"
    k = spots[int(rng.integers(len(spots)))]
    return name[:k] + "aeiou"[("aeiou".index(name[k]) + 1 + int(rng.integers(4))) % 5] + name[k + 1:]


def build_corpus(g: Graph, distractors_per_entity: float, rng: np.random.Generator) -> list[Page]:
    urls = entity_urls(g)
    pages = [entity_page(g, i, urls) for i in range(g.num_entities)]
    taken = set(g.names)
    for i in rng.integers(0, g.num_entities, int(round(distractors_per_entity * g.num_entities))).tolist():
        fake = _near_miss(g.names[i], rng)
        if fake in taken:
            continue
        taken.add(fake)
        text = (f"{fake} is a name with no recorded facts.\n"
                f"{fake} is not to be confused with {g.names[i]}.")
        pages.append(Page(url_for(fake) + "_(disambiguation)", fake, text, [urls[i]]))
    return pages
