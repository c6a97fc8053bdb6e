"""End-to-end synthesis: byte-identical outputs under a seed, brute-force re-verification of every task
against graph.jsonl (an evaluator written here from the file format, not the engine's Checker),
split hygiene, expert trajectories replayed through the tools, and the trained tokenizer."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import msgspec
import pytest
from tokenizers import Tokenizer

from sailor_engine.env.tools import SearchTool, VisitTool, call_tool
from sailor_engine.model.tokenizer import SPECIAL_TOKENS
from sailor_engine.synth.config import SynthConfig
from sailor_engine.synth.pipeline import is_test, load_world, run_synth, synthesize, write_world

CFG = SynthConfig(seed=7, num_entities=300, num_questions=240, search_top_k=3, level_mix=(0.35, 0.4, 0.25),
                  expert_max_tokens=4096, vocab_size=1024)
FILES = ["graph.jsonl", "tasks.train.jsonl", "tasks.test.jsonl", "corpus.jsonl", "experts.jsonl",
         "tokenizer.json", "summary.json", "index/params.index.json", "index/vocab.index.json",
         "index/data.csc.index.npy", "index/indices.csc.index.npy", "index/indptr.csc.index.npy"]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("synth") / "a"
    run_synth(CFG, d)
    return d


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_byte_identical_under_seed(out, tmp_path):
    # Another process with another str-hash seed: no output may depend on set or dict-of-str order.
    code = ("import msgspec, sys; from pathlib import Path; from sailor_engine.synth.config import SynthConfig; "
            "from sailor_engine.synth.pipeline import run_synth; "
            "run_synth(msgspec.json.decode(sys.argv[1], type=SynthConfig), Path(sys.argv[2]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, msgspec.json.encode(CFG).decode(), str(tmp_path / "b")],
                   check=True, env=env, capture_output=True)
    for name in FILES:
        assert (out / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    other = SynthConfig(**{**msgspec.structs.asdict(CFG), "seed": 8})
    run_synth(other, tmp_path / "c")
    assert (out / "tasks.train.jsonl").read_bytes() != (tmp_path / "c" / "tasks.train.jsonl").read_bytes()


class BruteForce:
    """Constraint semantics restated from the file format: plain dicts, loops over every entity."""

    def __init__(self, graph_path: Path) -> None:
        rows = _jsonl(graph_path)
        self.ents = {r["id"]: r for r in rows if "subject" not in r}
        self.triples = [(r["subject"], r["predicate"], r["object"]) for r in rows if "subject" in r]
        self.out, self.inn = defaultdict(list), defaultdict(list)
        for s, p, o in self.triples:
            self.out[s].append((p, o))
            self.inn[o].append((p, s))

    def sat(self, eid: str, node: dict) -> bool:
        e = self.ents[eid]
        if "type" in node and e["type"] != node["type"]:
            return False
        if "name" in node and e["name"] != node["name"]:
            return False
        if "initial" in node and not e["name"].startswith(node["initial"]):
            return False
        for a in node.get("attrs", []):
            table = e.get({"date": "dates", "number": "numbers", "category": "categories"}[a["kind"]], {})
            if a["attr"] not in table:
                return False
            v = table[a["attr"]]
            if a["kind"] == "category":
                if v != a["value"]:
                    return False
            elif ("lo" in a and v < a["lo"]) or ("hi" in a and v > a["hi"]):
                return False
        if "degree" in node:
            d = node["degree"]
            side = self.out if d["direction"] == "out" else self.inn
            if sum(p == d["predicate"] for p, _ in side[eid]) != d["count"]:
                return False
        for link in node.get("links", []):
            nbrs = []
            if link["direction"] in ("out", "any"):
                nbrs += [o for p, o in self.out[eid] if p in link["predicates"]]
            if link["direction"] in ("in", "any"):
                nbrs += [s for p, s in self.inn[eid] if p in link["predicates"]]
            if not any(self.sat(x, link["node"]) for x in nbrs):
                return False
        return True

    def solutions(self, node: dict) -> list[str]:
        return [eid for eid in self.ents if self.sat(eid, node)]


def test_every_task_has_exactly_its_answer(out):
    bf = BruteForce(out / "graph.jsonl")
    tasks = _jsonl(out / "tasks.train.jsonl") + _jsonl(out / "tasks.test.jsonl")
    assert len(tasks) == CFG.num_questions
    for t in tasks:
        assert bf.solutions(t["constraints"]) == [t["answer_id"]], t["question"]
        assert bf.ents[t["answer_id"]]["name"] == t["answer"]
        assert t["answer_id"] in t["entities"]
        assert t["answer"] not in t["question"]  # the answer is never named in its own question


def _anchors(node: dict) -> list[dict]:
    leaves = [link["node"] for link in node.get("links", [])]
    return [a for leaf in leaves for a in ([leaf] if not leaf.get("links") else _anchors(leaf))]


def _depth(node: dict) -> int:
    return 1 + max((_depth(link["node"]) for link in node.get("links", [])), default=-1) if node.get("links") else 0


def test_levels_hops_and_split(out):
    train, test = _jsonl(out / "tasks.train.jsonl"), _jsonl(out / "tasks.test.jsonl")
    tasks = train + test
    quota = Counter(t["level"] for t in tasks)
    assert quota == {1: 84, 2: 96, 3: 60}  # largest remainder of 0.35 / 0.4 / 0.25 of 240
    for t in tasks:
        anchors = _anchors(t["constraints"])
        assert t["hops"] == _depth(t["constraints"]) <= CFG.max_hops
        if t["level"] == 1:
            assert t["hops"] == 1 and all("name" in a for a in anchors)
        elif t["level"] == 2:
            assert t["hops"] >= 2 and all("name" in a for a in anchors)
        else:
            assert any("name" not in a for a in anchors)
    assert not {t["answer_id"] for t in train} & {t["answer_id"] for t in test}
    assert 0 < len(test) < len(train)
    kinds = Counter(o for t in tasks for o in t["obfuscations"])
    assert set(kinds) == {"vague_date", "number_range", "partial_name", "generic_descriptor",
                          "semantic_ambiguity", "distractor_noise", "structural"}


def test_expert_trajectories_replay_through_the_tools(out):
    world = load_world(out, CFG)
    tasks = {t.id: t for t in world.train}
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tools = {"search": SearchTool(world.web), "visit": VisitTool(world.web)}
    assert len(world.experts) >= len(world.train) // 2
    for traj in world.experts:
        msgs = traj.messages
        assert [m.role for m in msgs[:2]] == ["system", "user"] and msgs[1].content == tasks[traj.task_id].question
        calls = 0
        for call, resp in zip(msgs[2::2], msgs[3::2]):
            body = call.content.split("<tool_call>")[1].split("</tool_call>")[0]
            req = json.loads(body)
            obs = asyncio.run(call_tool(tools[req["name"]], req["arguments"]))
            assert resp.role == "tool" and resp.content == f"<tool_response>\n{obs}\n</tool_response>"
            calls += 1
        assert calls == traj.num_tool_calls >= CFG.expert_min_tool_calls
        assert msgs[-1].content.endswith(f"<answer>{tasks[traj.task_id].answer}</answer>")
        text = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in msgs)
        assert traj.num_tokens == len(tok.encode(text).ids) <= CFG.expert_max_tokens


def test_tokenizer_special_tokens(out):
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i and tok.encode(f"x{s}y").tokens.count(s) == 1
    names = [e["name"] for e in _jsonl(out / "graph.jsonl") if "subject" not in e]
    assert all(len(tok.encode(" " + n).ids) >= 2 for n in names)
    assert tok.decode(tok.encode("Talen Morvik <think>x</think>").ids, skip_special_tokens=False) == "Talen Morvik <think>x</think>"


def test_in_memory_world_matches_files(out):
    world = synthesize(CFG)
    enc = msgspec.json.Encoder()
    assert b"".join(enc.encode(t) + b"\n" for t in world.train) == (out / "tasks.train.jsonl").read_bytes()
    assert len(world.pages) == len(_jsonl(out / "corpus.jsonl"))


def test_rewrite_hook_changes_text_only(tmp_path):
    cfg = SynthConfig(seed=3, num_entities=200, num_questions=20, vocab_size=512)
    plain = synthesize(cfg)
    loud = synthesize(cfg, rewrite=lambda q, task: q.upper())
    for a, b in zip(plain.train, loud.train):
        assert b.question == a.question.upper() and b.constraints == a.constraints and b.answer == a.answer


def test_tasks_from_a_triples_file(tmp_path):
    """A graph read from JSONL (generic schema path: sorted types, loaded predicates) gives verified tasks."""
    from sailor_engine.synth.graph import synthetic_world, write_graph

    path = tmp_path / "triples.jsonl"
    write_graph(synthetic_world(SynthConfig(seed=5, num_entities=250)), path)
    world = synthesize(SynthConfig(graph=str(path), num_questions=60, vocab_size=512, level_mix=(1, 1, 1)))
    bf = BruteForce(path)
    tasks = world.train + world.test
    assert len(tasks) == 60 and world.experts
    for t in tasks:
        assert bf.solutions(msgspec.to_builtins(t.constraints)) == [t.answer_id]


@pytest.mark.parametrize("overrides, words", [
    ({"graph": "/no/such/triples.jsonl"}, "synth.graph"),
    ({"max_hops": 1}, "synth.max_hops >= 2"),
    ({"subgraph_max_nodes": 2}, "synth.subgraph_max_nodes >= 3"),
])
def test_bad_settings_fail_before_work(overrides, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        synthesize(SynthConfig(num_entities=100, num_questions=10, **overrides))


@pytest.mark.parametrize("triples", [[], [{"subject": "a", "predicate": "born_in", "object": "b"}]])
def test_small_graph_reports_a_shortfall(tmp_path, capsys, triples):
    path = tmp_path / "tiny.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [E_ANN, E_BAY, *triples]) + "\n")
    run_synth(SynthConfig(graph=str(path), num_questions=50, vocab_size=300, level_mix=(1, 0, 0)), tmp_path / "s")
    made = json.loads((tmp_path / "s" / "summary.json").read_text())["tasks"]
    # One relation between two plain entities: exactly two distinct questions (either end the answer).
    assert made["train"] + made["test"] == 2 * len(triples) and "warning" in capsys.readouterr().out


E_ANN = {"id": "a", "type": "person", "name": "Ann Lee"}
E_BAY = {"id": "b", "type": "place", "name": "Bay"}


def test_expert_fraction_leaves_a_pool_with_fresh_answers():
    """synth.expert_fraction: experts only for a share of the training tasks chosen by answer entity,
    so the other tasks (an RL pool) have answers no expert trajectory ever gave."""
    cfg = msgspec.structs.replace(CFG, num_questions=120, expert_fraction=0.5)
    w = synthesize(cfg)
    full = synthesize(msgspec.structs.replace(cfg, expert_fraction=1.0))
    assert [t.id for t in w.train] == [t.id for t in full.train]  # the split does not move tasks
    by_id = {t.id: t for t in w.train}
    expert_answers = {by_id[e.task_id].answer_id for e in w.experts}
    pool = [t for t in w.train if t.id not in {e.task_id for e in w.experts}]
    fresh = [t for t in pool if t.answer_id not in expert_answers]
    assert 0 < len(w.experts) < len(full.experts) and len(fresh) > len(pool) // 2
    # every expert is one the full run makes too (same oracle), restricted to the share
    assert {e.task_id for e in w.experts} <= {e.task_id for e in full.experts}
    share = {t.answer_id for t in w.train if is_test(f"{cfg.seed}:experts", t.answer_id, 0.5)}
    assert expert_answers <= share


def test_a_written_world_serves_search_as_it_was_synthesized(tmp_path):
    """The expert trajectories hold search results of the synth-time settings: a reader with another
    (or the default) synth config must still get those, or the RFT model sees another format in RL."""
    cfg = msgspec.structs.replace(CFG, num_questions=40, search_top_k=2, snippet_chars=40)
    w = synthesize(cfg)
    write_world(w, tmp_path)
    back = load_world(tmp_path, SynthConfig())  # defaults: 5 results, 80 characters
    assert (back.web.top_k, back.web.snippet_chars) == (2, 40)
    q = w.test[0].question
    assert asyncio.run(call_tool(SearchTool(back.web), {"query": [q]})) == \
        asyncio.run(call_tool(SearchTool(w.web), {"query": [q]}))


def _named_on_path(traj) -> list[int]:
    """For each hop of an expert trajectory (a visit whose goal is one relation, followed by "which fits"),
    how many entities the page's evidence line for that relation names: read from the text alone."""
    counts = []
    msgs = traj.messages
    for k in range(2, len(msgs) - 2):
        call, resp, nxt = msgs[k], msgs[k + 1], msgs[k + 2]
        if '"name":"visit"' not in call.content or "which fits the question" not in nxt.content:
            continue
        goal = json.loads(call.content.split("<tool_call>")[1].split("</tool_call>")[0])["arguments"]["goal"]
        line = next(s for s in resp.content.splitlines() if s.startswith(goal + " "))
        names = line[len(goal) + 1:].rstrip(".").replace(" and ", ", ").split(", ")
        counts.append(len(names))
    return counts


def test_forced_paths_keeps_the_questions_whose_hops_name_one_entity():
    """synth.forced_paths: the same questions minus those where a page on the path names several entities
    for the relation taken (the oracle would pick the right one with knowledge the agent lacks)."""
    cfg = msgspec.structs.replace(CFG, num_questions=200, expert_max_tokens=1 << 16, level_mix=(0.5, 0.5, 0.0))
    full = synthesize(cfg)
    forced = synthesize(msgspec.structs.replace(cfg, forced_paths=True))
    kept = {t.id for t in forced.train + forced.test}
    assert [t.question for t in forced.train] == [t.question for t in full.train if t.id in kept]
    assert [t.question for t in forced.test] == [t.question for t in full.test if t.id in kept]
    hops = {e.task_id: _named_on_path(e) for e in full.experts}
    assert all(len(c) >= 1 for c in hops.values())
    assert {i for i, c in hops.items() if c == [1] * len(c)} == kept & set(hops)
    assert 0 < len(kept) < len(full.train) + len(full.test)
    assert {e.task_id for e in forced.experts} == kept & set(hops)
