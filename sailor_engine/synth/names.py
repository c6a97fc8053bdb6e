"""Plausible, unique entity names built from a small syllable inventory.

Names made of a few dozen shared syllables split into frequent sub-word pieces under BPE, so a small
model learns to copy them piece by piece (whole-word name tokens are never learned; see issue 8).
The inventory gives ~10^7 person names, so 100k-entity worlds stay unique without long names.
"""

from __future__ import annotations

import numpy as np

SYLLABLES = (
    "ka", "lo", "mi", "ra", "ten", "vor", "sel", "da", "ni", "bri", "tal", "en", "mor", "vik", "zan",
    "pel", "ori", "sha", "del", "wen", "gar", "ish", "ton", "ber", "lin", "cas", "dor", "fen", "hal",
    "jun", "kel", "mar", "nor", "ost", "qui", "ros", "sav", "tir", "ul", "yen", "bel", "cor", "dan",
    "el", "fa", "gor", "ha", "is",
)
ORG_SUFFIX = ("Group", "Works", "Press", "Holdings", "Company", "Institute", "Lines", "Partners")
EVENT_SUFFIX = ("Week", "Days", "Gathering", "Meet")
WORK_ADJ = ("Silent", "Golden", "Broken", "Hidden", "Last", "Northern", "Distant", "Burning", "Quiet",
            "Iron", "Pale", "Winter", "Crimson", "Lost", "Second", "Endless", "Bitter", "Little")
WORK_NOUN = ("Harbor", "Garden", "River", "Tower", "Letter", "Voyage", "Mirror", "Orchard", "Bridge",
             "Lantern", "Season", "Crown", "Island", "Window", "Road", "Song", "Field", "Anchor")


def _word(rng: np.random.Generator, lo: int, hi: int) -> str:
    k = int(rng.integers(lo, hi + 1))
    return "".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), k)).capitalize()


def _one(kind: str, rng: np.random.Generator) -> tuple[str, list[str]]:
    if kind == "person":
        first, last = _word(rng, 2, 2), _word(rng, 2, 3)
        return f"{first} {last}", [f"{first[0]}. {last}"]
    if kind == "organisation":
        root = _word(rng, 2, 3)
        return f"{root} {ORG_SUFFIX[rng.integers(len(ORG_SUFFIX))]}", [root]
    if kind == "place":
        return _word(rng, 2, 3), []
    if kind == "work":
        adj, noun = WORK_ADJ[rng.integers(len(WORK_ADJ))], WORK_NOUN[rng.integers(len(WORK_NOUN))]
        if rng.random() < 0.3:
            return f"The {adj} {noun}", []
        return f"{noun} of {_word(rng, 2, 3)}", []
    if kind == "event":
        return f"{_word(rng, 2, 3)} {EVENT_SUFFIX[rng.integers(len(EVENT_SUFFIX))]}", []
    return _word(rng, 2, 3), []


def make_names(kinds: list[str], rng: np.random.Generator) -> tuple[list[str], list[list[str]]]:
    """One unique name (and aliases) per entity kind, in order. Raises if the name space runs out."""
    seen: set[str] = set()
    out_names, out_aliases = [], []
    for kind in kinds:
        for _ in range(1000):
            name, aliases = _one(kind, rng)
            if name not in seen:
                break
        else:
            raise ValueError(f"name space exhausted for {kind!r} after {len(seen)} names")
        seen.add(name)
        out_names.append(name)
        out_aliases.append(aliases)
    return out_names, out_aliases
