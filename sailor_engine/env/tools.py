"""The offline web: `search` and `visit` over a corpus of pages, as async tools with msgspec schemas.

Any corpus of `Page`s works (synth/corpus.py renders one from the knowledge graph); env imports
nothing from synth, so the arrow is synth -> env. BM25 (bm25s) ranks pages on title + text.

The tools follow env/protocol.py (name, description, args_type, `await tool(args) -> str` with args
an instance of args_type); `await call_tool(tool, raw_arguments)` validates decoded JSON first, for
callers without the ToolRunner (the expert oracle, tests).
Bad arguments, unknown urls and empty results are observations, never exceptions: the policy sees
what went wrong and the run goes on.

    web = OfflineWeb(pages, top_k=5)
    tools = {t.name: t for t in (SearchTool(web), VisitTool(web))}
    await call_tool(tools["search"], {"query": ["Talen Morvik"]})
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import bm25s
import msgspec
import numpy as np

if TYPE_CHECKING:
    from sailor_engine.env.protocol import Tool

SEPARATOR = "\n=======\n"  # between the blocks of a multi-query search or a multi-url visit
MAX_ITEMS = 8  # queries / urls per call: bounds the observation length


class Page(msgspec.Struct, forbid_unknown_fields=True):
    """One page of the offline web. `text` holds one statement per line."""

    url: str
    title: str
    text: str
    links: list[str] = []


class SearchArgs(msgspec.Struct, forbid_unknown_fields=True):
    query: Annotated[list[str], msgspec.Meta(min_length=1, max_length=MAX_ITEMS, description="Queries, searched separately.")]


class VisitArgs(msgspec.Struct, forbid_unknown_fields=True):
    url: Annotated[list[str], msgspec.Meta(min_length=1, max_length=MAX_ITEMS, description="Urls to read (from search results).")]
    goal: Annotated[str, msgspec.Meta(description="What to look for on the pages.")]


# Function words carry no evidence: "Nigar is the birthplace of" must match on "birthplace".
_STOP = frozenset("a an and as at be by for from has have in is it its of on or that the to was were which who with".split())


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"\w\w+", text.lower()) if w not in _STOP]


class OfflineWeb:
    """Pages + a BM25 index; `search` and `visit` return the observation text."""

    def __init__(self, pages: list[Page], top_k: int = 5, snippet_chars: int = 120,
                 retriever: bm25s.BM25 | None = None) -> None:
        if not pages:
            raise ValueError("OfflineWeb needs at least one page")
        self.pages, self.top_k, self.snippet_chars = pages, top_k, snippet_chars
        self.by_url = {p.url: i for i, p in enumerate(pages)}
        if retriever is None:
            retriever = bm25s.BM25()
            docs = [f"{p.title}\n{p.text}" for p in pages]
            retriever.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
        self.retriever = retriever
        self.vocab = set(retriever.vocab_dict)
        self.titles = [" ".join(p.title.lower().split()) for p in pages]

    def save(self, path: Path) -> None:
        self.retriever.save(str(path), show_progress=False)

    @classmethod
    def load(cls, path: Path, pages: list[Page], top_k: int = 5, snippet_chars: int = 120) -> OfflineWeb:
        return cls(pages, top_k, snippet_chars, bm25s.BM25.load(str(path)))

    def rank(self, queries: list[str], k: int | None = None) -> list[list[int]]:
        """Page indices per query, best first, only pages with a positive score.

        BM25 has no fields, so a page titled exactly like the query can lose to a longer page that
        repeats the query's words ("Casen" the place vs "Casen Savnihal" the person); like any search
        engine, exact title matches among the BM25 candidates (4k deep) are moved to the front.
        """
        k = min(k or self.top_k, len(self.pages))
        deep = min(4 * k + 16, len(self.pages))
        tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
        tokens = [[t for t in q if t in self.vocab] for q in tokens]
        out: list[list[int]] = [[] for _ in queries]
        live = [i for i, q in enumerate(tokens) if q]
        if live:
            docs, scores = self.retriever.retrieve([tokens[i] for i in live], k=deep, show_progress=False, n_threads=1)
            for row, i in enumerate(live):
                hits = [int(d) for d, s in zip(docs[row], scores[row]) if s > 0]
                q = " ".join(queries[i].lower().split())
                hits.sort(key=lambda d: self.titles[d] != q)  # stable: BM25 order otherwise
                out[i] = hits[:k]
        return out

    def snippet(self, page: Page) -> str:
        """The page's opening, with the title dropped from the start of every line but the first."""
        lines = page.text.split("\n")
        t = len(page.title)
        rest = [ln[t + 1:] if ln.startswith(page.title + " ") else ln for ln in lines[1:]]
        text = "; ".join(ln.rstrip(".") for ln in [lines[0], *rest])
        if len(text) <= self.snippet_chars:
            return text
        return text[: self.snippet_chars].rsplit(" ", 1)[0] + " ..."

    def search(self, queries: list[str]) -> str:
        blocks = []
        for q, hits in zip(queries, self.rank(queries)):
            if not hits:
                blocks.append(f"No results for '{q}'.")
                continue
            lines = [f"Results for '{q}':"]
            for r, i in enumerate(hits, 1):
                p = self.pages[i]
                lines.append(f"{r}. {p.title}\n{p.url}\n{self.snippet(p)}")
            blocks.append("\n".join(lines))
        return SEPARATOR.join(blocks)

    def evidence(self, page: Page, goal: str, max_lines: int = 3) -> tuple[list[str], str]:
        """(the page's lines sharing the most words with the goal, in page order; the best one).

        With no overlap at all, the page's lead lines and its first line.
        """
        lines = page.text.split("\n")
        # The page's own name is on every line: it says nothing about which line serves the goal.
        want = set(_words(goal)) - set(_words(page.title)) or set(_words(goal))
        score = np.array([len(want & set(_words(line))) for line in lines])
        if score.max(initial=0) == 0:
            return lines[:max_lines], lines[0]
        best = np.argsort(-score, kind="stable")[:max_lines]
        return [lines[i] for i in sorted(best) if score[i] > 0], lines[best[0]]

    def visit(self, urls: list[str], goal: str) -> str:
        blocks = []
        for url in urls:
            i = self.by_url.get(url.strip())
            if i is None:
                blocks.append(f"Page not found: {url}. Only urls from search results can be visited.")
                continue
            page = self.pages[i]
            ev, summary = self.evidence(page, goal)
            # The summary is the single best line; with one line of evidence it would only repeat it.
            tail = f"\nSummary: {summary}" if len(ev) > 1 else ""
            blocks.append(f"Page: {page.title}\n{url}\nEvidence:\n" + "\n".join(ev) + tail)
        return SEPARATOR.join(blocks)


class SearchTool:
    name = "search"
    description = "Search the web. Arguments: {\"query\": [str, ...]}; returns title, url and snippet per result."
    args_type = SearchArgs

    def __init__(self, web: OfflineWeb) -> None:
        self.web = web

    async def __call__(self, args: SearchArgs) -> str:
        return self.web.search(args.query)


class VisitTool:
    name = "visit"
    description = "Read web pages. Arguments: {\"url\": [str, ...], \"goal\": str}; returns the evidence found for the goal."
    args_type = VisitArgs

    def __init__(self, web: OfflineWeb) -> None:
        self.web = web

    async def __call__(self, args: VisitArgs) -> str:
        return self.web.visit(args.url, args.goal)


async def call_tool(tool: "Tool", arguments: object) -> str:
    """Validate decoded JSON arguments against the tool's schema, then run it; bad input -> observation."""
    try:
        args = msgspec.convert(arguments, tool.args_type)
    except msgspec.ValidationError as e:
        return f"Invalid arguments for {tool.name}: {e}. {tool.description}"
    return await tool(args)
