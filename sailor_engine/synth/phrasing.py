"""The one phrasing of facts shared by pages, questions and noise ("was born in 1984", "employs X").

Pages and questions say a fact the same way, so a small model can match a clue to the line of a
page that answers it; graphs loaded from triples fall back to generic phrasing per attribute.
"""

from __future__ import annotations

from sailor_engine.synth.graph import Relation

_DATE = {"birth_year": "was born", "founded_year": "was founded", "published_year": "was published",
         "year": "took place"}
_NUMBER = {"employees": "has {} employees", "population": "has a population of {}", "copies_sold": "sold {} copies",
           "attendance": "drew {} visitors"}
_CATEGORY = {"occupation": "works as {}", "industry": "works in {}", "kind": "is {}", "genre": "is {}"}
PLURAL = {"person": "people"}
_HEAD = {"industry": "{} organisation"}  # a category value as a head noun: "a software organisation"


def descriptor_noun(attr: str, value: str) -> str:
    return _HEAD.get(attr, "{}").format(value)


def article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def attr_clause(a) -> str:
    """Verb phrase for a constraints.Attr (uses its phrase for dates and numbers)."""
    words = a.attr.replace("_", " ")
    if a.kind == "date":
        return f"{_DATE.get(a.attr, 'has ' + words)} {a.phrase}"
    if a.kind == "number":
        return _NUMBER.get(a.attr, f"has {words} {{}}").format(a.phrase)
    if a.attr == "industry":
        return _CATEGORY["industry"].format(a.value)
    return _CATEGORY.get(a.attr, f"has {words} {{}}").format(article(a.value))


def relation_phrase(rel: Relation, direction: str) -> str:
    return rel.forward if direction == "out" else rel.inverse
