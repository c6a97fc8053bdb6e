"""Expert trajectories for the RFT cold start: an oracle that solves each task through the real tools.

The oracle knows the task's subgraph but acts only through `search` and `visit` on the offline web,
and every step must be earned: the entity it moves to next has to appear in the observation it just
received, or the trajectory is abandoned (a hub page that does not list the next entity, a search
that misses the page). Plan: start at the named anchor farthest from the answer, hop along the tree
path to the answer (search the name, visit its page with a goal naming the relation), then read the
answer's page for the remaining clues and answer. Each step carries a short reconstructed thought,
as WebSailor does. Questions with no named anchor (some level-3) get no trajectory.

Records are chat messages with the agent tags embedded in the content:
    assistant: "<think>...</think>\\n<tool_call>{"name": "search", "arguments": {...}}</tool_call>"
    tool:      "<tool_response>\\n...\\n</tool_response>"
    assistant: "<think>...</think>\\n<answer>...</answer>"
"""

from __future__ import annotations

import asyncio

import re

import msgspec

from sailor_engine.env.tools import OfflineWeb, SearchTool, VisitTool, call_tool
from sailor_engine.synth.constraints import Checker, Node
from sailor_engine.synth.graph import Graph
from sailor_engine.synth.phrasing import attr_clause, relation_phrase
from sailor_engine.synth.questions import Task

SYSTEM_PROMPT = (
    "Answer the question with the tools. Think in <think></think>, then call one tool in "
    "<tool_call></tool_call> or answer in <answer></answer>.\n"
    "search: {\"query\": [str]} -> pages with url and snippet.\n"
    "visit: {\"url\": [str], \"goal\": str} -> evidence on each page for the goal."
)


class Message(msgspec.Struct, forbid_unknown_fields=True):
    role: str  # system | user | assistant | tool
    content: str


class Trajectory(msgspec.Struct, forbid_unknown_fields=True):
    task_id: str
    answer: str
    messages: list[Message]
    num_tool_calls: int
    num_tokens: int = 0  # ChatML-rendered length under the trained tokenizer (set by the filter)


def chatml(messages: list[Message]) -> str:
    """The ChatML text a trainer would see; used to count tokens for the length filter."""
    return "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)


def _tree_entities(g: Graph, checker: Checker, task: Task) -> dict[int, int]:
    """id(Node) -> entity for the task's tree, matched inside the task's subgraph."""
    allowed = {g.index[e] for e in task.entities}
    out: dict[int, int] = {}

    def assign(node: Node, v: int) -> None:
        out[id(node)] = v
        for link in node.links:
            ok = checker.candidates(link.node)
            for e, u, outgoing in g.edges_of(v):
                if (u in allowed and u not in out.values() and ok[u] and g.relations[g.pred[e]].name in link.predicates
                        and link.direction in ("any", "out" if outgoing else "in")):
                    assign(link.node, u)
                    break

    assign(task.constraints, g.index[task.answer_id])
    return out


def _anchor_path(task: Task, owner: dict[int, int]) -> list[tuple[Node, Node | None]] | None:
    """[(node, parent)] from the deepest named anchor up to the root, or None if no anchor is named."""
    best: list[tuple[Node, Node | None]] | None = None
    stack: list[list[tuple[Node, Node | None]]] = [[(task.constraints, None)]]
    while stack:
        path = stack.pop()
        node = path[-1][0]
        if node.name is not None and (best is None or len(path) > len(best)):
            best = path
        stack += [path + [(link.node, node)] for link in node.links]
    if best is None or any(id(n) not in owner for n, _ in best):
        return None
    return best[::-1]


class Oracle:
    """Writes one task's trajectory by calling the tools; `solve` returns None when a step fails."""

    def __init__(self, g: Graph, web: OfflineWeb, urls: list[str]) -> None:
        self.g, self.web, self.urls, self.checker = g, web, urls, Checker(g)
        self.search, self.visit = SearchTool(web), VisitTool(web)

    async def _call(self, msgs: list[Message], thought: str, tool, args: dict) -> str:
        call = msgspec.json.encode({"name": tool.name, "arguments": args}).decode()
        msgs.append(Message("assistant", f"<think>{thought}</think>\n<tool_call>{call}</tool_call>"))
        obs = await call_tool(tool, args)
        msgs.append(Message("tool", f"<tool_response>\n{obs}\n</tool_response>"))
        return obs

    async def _reach(self, msgs: list[Message], v: int, goal: str, why: str) -> str | None:
        """Search v's name, then visit v's page (only if search listed it) with the goal."""
        name, url = self.g.names[v], self.urls[v]
        found = await self._call(msgs, f"{why} I will search for {name}.", self.search, {"query": [name]})
        if url not in found.split("\n"):
            return None
        return await self._call(msgs, f"I will read the page of {name}.", self.visit,
                                {"url": [url], "goal": goal})

    async def solve(self, task: Task) -> Trajectory | None:
        g = self.g
        owner = _tree_entities(g, self.checker, task)
        path = _anchor_path(task, owner)
        if path is None:
            return None
        msgs = [Message("system", SYSTEM_PROMPT), Message("user", task.question)]
        why = "The question names {}."
        for node, parent in path:
            v = owner[id(node)]
            if parent is None:  # at the answer: read its page for the remaining clues, if any
                if not (node.attrs or node.degree or len(node.links) > 1):
                    why += " So it is the answer."
                    break
                goal = f"{g.names[v]} {', '.join(_clue_words(g, node))}"
                obs = await self._reach(msgs, v, goal, f"{why} It may be the answer; I will check the other clues.")
                if obs is None:
                    return None
                why = ""
                break
            link = next(lk for lk in parent.links if lk.node is node)
            e = _link_edge(g, owner[id(parent)], v, link)
            rel = g.relations[g.pred[e]]
            phrase = relation_phrase(rel, "out" if int(g.src[e]) == v else "in")
            obs = await self._reach(msgs, v, f"{g.names[v]} {phrase}", why.format(g.names[v]))
            nxt_v = owner[id(parent)]
            if obs is None or g.names[nxt_v] not in obs:
                return None
            how = "is linked to" if link.direction == "any" else phrase
            why = f"{g.names[v]} {how} {g.names[nxt_v]}, which fits the question."
        n_calls = sum(m.role == "tool" for m in msgs)
        thought = why or f"{task.answer} satisfies every clue of the question."
        msgs.append(Message("assistant", f"<think>{thought}</think>\n<answer>{task.answer}</answer>"))
        return Trajectory(task.id, task.answer, msgs, n_calls)


def forced_path(g: Graph, checker: Checker, task: Task) -> bool:
    """Whether every hop from the named anchor to the answer is forced: the page of each entity on the
    path names exactly one entity for the relation the path takes, so no choice needs knowledge the
    agent has not read yet (the other clues, if any, are then only checks). False without an anchor."""
    owner = _tree_entities(g, checker, task)
    path = _anchor_path(task, owner)
    if path is None:
        return False
    for node, parent in path[:-1]:
        v, link = owner[id(node)], next(lk for lk in parent.links if lk.node is node)
        e = _link_edge(g, owner[id(parent)], v, link)
        out = int(g.src[e]) == v
        if sum(g.pred[k] == g.pred[e] and o == out for k, _, o in g.edges_of(v)) != 1:
            return False
    return True


def _clue_words(g: Graph, node: Node) -> list[str]:
    """The answer's own clues, phrased as its page phrases them ("works as a chemist", "employs")."""
    rels = {r.name: r for r in g.relations}
    words = [attr_clause(a) for a in node.attrs]
    words += ["is linked to" if lk.direction == "any" else relation_phrase(rels[lk.predicates[0]], lk.direction)
              for lk in node.links]
    if node.degree is not None:
        words.append(relation_phrase(rels[node.degree.predicate], node.degree.direction))
    return words


def _link_edge(g: Graph, u: int, v: int, link) -> int:
    """The edge between parent u and child v that the link describes."""
    return next(e for e, w, outgoing in g.edges_of(u) if w == v and g.relations[g.pred[e]].name in link.predicates
                and link.direction in ("any", "out" if outgoing else "in"))


def expert_trajectories(g: Graph, web: OfflineWeb, urls: list[str], tasks: list[Task], advance=None) -> list[Trajectory]:
    """One trajectory per task the oracle can solve, in task order (length filters come later)."""
    oracle = Oracle(g, web, urls)

    async def run() -> list[Trajectory]:
        out = []
        for t in tasks:
            traj = await oracle.solve(t)
            if traj is not None:
                out.append(traj)
            if advance is not None:
                advance(1)
        return out

    return asyncio.run(run())


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def final_answer(t: Trajectory) -> str | None:
    m = _ANSWER.search(t.messages[-1].content) if t.messages else None
    return m.group(1).strip() if m else None


def filter_trajectories(trajs: list[Trajectory], count_tokens, max_tokens: int, min_tool_calls: int) -> list[Trajectory]:
    """Keep trajectories whose final answer is the task's, with <= max_tokens (ChatML) and >= min_tool_calls.

    count_tokens: str -> int (the trained tokenizer); sets num_tokens on every trajectory.
    """
    kept = []
    for t in trajs:
        t.num_tokens = count_tokens(chatml(t.messages))
        if final_answer(t) == t.answer and t.num_tokens <= max_tokens and t.num_tool_calls >= min_tool_calls:
            kept.append(t)
    return kept
