"""AgentLoop: token-in/token-out trajectories, masks, parking on tools, limits, malformed output.

The policy here is scripted (ScriptedLM): the loop, the generator's scheduling and the real tool
runner are under test, not a model, so the model's next token is chosen by a rule over the context.
"""

import re
import time

import msgspec
import pytest
import torch
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers

from sailor_engine.env.protocol import FunctionTool
from sailor_engine.env.runner import ToolLimits, ToolRunner
from sailor_engine.model.attention import KVCache
from sailor_engine.model.tokenizer import SPECIAL_TOKENS, Tokenizer
from sailor_engine.rollout.agent import AgentLoop
from sailor_engine.rollout.format import ANSWER_NOW, Answer, ChatTemplate, Malformed, ToolCall, parse_turn
from sailor_engine.rollout.generator import Generator, SamplingParams


@pytest.fixture(scope="module")
def tok():
    raw = RawTokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    corpus = ['{"name": "lookup", "arguments": {"key": "alpha"}}', "the value of alpha is 42", "think answer"] * 10
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(raw)


class ScriptedLM(torch.nn.Module):
    """Emits the tokens of `script(context_text, turn) -> turn_text` one at a time, deterministically.

    A chunk longer than one token is a prefill (prompt, observation, or a whole history re-prefilled
    after a cache eviction): the next turn starts after it. The turn number is the number of tool
    responses in the context.
    """

    def __init__(self, tok, script):
        super().__init__()
        self.tok, self.script = tok, script
        self.embed_tokens = torch.nn.Embedding(1, 1)
        self.hist, self.turn_start = {}, {}

    def new_kv_cache(self, num_slots, max_seq_len, dtype=None):
        return KVCache(1, num_slots, max_seq_len, 1, 1)

    def forward_cached(self, ids, cu, cache, slots):
        V = self.tok.vocab_size
        out = torch.zeros(len(ids), V)
        for i, slot in enumerate(slots.tolist()):
            start, chunk = int(cache.lengths[slot]), ids[cu[i]:cu[i + 1]].tolist()
            h = self.hist.setdefault(slot, [])
            del h[start:]
            h.extend(chunk)
            cache.lengths[slot] = len(h)
            if len(chunk) > 1:
                self.turn_start[slot] = len(h)
            text = self.tok.decode(h)
            turn = self.tok.encode(self.script(text, text.count("</tool_response>")))
            k = len(h) - self.turn_start[slot]
            nxt = turn[k] if k < len(turn) else self.tok.eos_id
            out[int(cu[i + 1]) - 1, nxt] = 30.0
        return out

    def logits(self, hidden):
        return hidden


def lookup(args):
    time.sleep(0.02)
    return {"alpha": "42", "beta": "17"}.get(args.key, "no such key")


class LookupArgs(msgspec.Struct, forbid_unknown_fields=True):
    key: str


def tools():
    return [FunctionTool("lookup", lookup, LookupArgs, "Look a key up.")]


class Task(msgspec.Struct):
    id: str
    question: str


def run(tok, script, tasks, group_size=2, **kw):
    gen = Generator(ScriptedLM(tok, script), max_batch=3, max_seq_len=kw.pop("max_seq_len", 400))
    with ToolRunner(tools(), limits=ToolLimits(timeout_s=2.0)) as runner:
        loop = AgentLoop(gen, runner, ChatTemplate(tok), params=SamplingParams(greedy=True, max_new_tokens=60),
                         system="Answer questions.", **kw)
        return loop.run(tasks, group_size=group_size), loop


def good_script(text, turn):
    key = re.search(r"key (\w+)\?", text).group(1)
    if turn == 0:
        return f'<think>look up {key}</think><tool_call>{{"name": "lookup", "arguments": {{"key": "{key}"}}}}</tool_call>'
    value = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text)[-1]
    return f"<think>found it</think><answer>{value}</answer>"


def test_episodes_call_tools_and_answer_token_exactly(tok):
    tasks = [Task("t0", "What is key alpha?"), Task("t1", "What is key beta?"), Task("t2", "What is key gamma?")]
    trajs, loop = run(tok, good_script, tasks, group_size=2)
    assert [(t.task_id, t.sample) for t in trajs] == [(f"t{i}", g) for i in range(3) for g in range(2)]
    tpl = ChatTemplate(tok)
    for t, want in zip(trajs, ["42", "42", "17", "17", "no such key", "no such key"]):
        assert t.status == "answered" and t.answer == want and t.turns == 2
        assert [c.name for c in t.tool_calls] == ["lookup"] and t.tool_calls[0].ok
        assert len(t.token_ids) == len(t.loss_mask) == len(t.logprobs)
        # the exact stream: prompt, turn 1, observation, turn 2 -- each tokenised on its own
        q = tasks[int(t.task_id[1])].question
        prompt = tpl.prompt(q, "Answer questions.")
        turn1 = tok.encode(good_script(q, 0))
        obs = tpl.observation(want)
        turn2 = tok.encode(f"<think>found it</think><answer>{want}</answer>")
        assert t.token_ids == prompt + turn1 + obs + turn2
        assert t.loss_mask == [0] * len(prompt) + [1] * len(turn1) + [0] * len(obs) + [1] * len(turn2)
        assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.loss_mask) if m == 0)
        assert all(lp <= 0.0 for lp in t.logprobs)
        assert t.prompt_len == len(prompt)


def test_a_finished_episode_frees_its_cache_row_at_once(tok):
    """Six episodes on three cache rows that answer at once: the last three take the rows the first
    three freed, nothing is evicted (a finished episode holding its row would be evicted in place of
    one parked on a tool, which would then prefill its whole history again)."""
    tasks = [Task(f"t{i}", "What is key alpha?") for i in range(3)]
    trajs, loop = run(tok, lambda text, turn: "<think>known</think><answer>42</answer>", tasks, group_size=2)
    assert [t.status for t in trajs] == ["answered"] * 6 and loop.gen.stats["evictions"] == 0
    assert not loop.gen.sessions and len(loop.gen.free_slots) == 3


def test_malformed_turns_become_observations_then_answer_now(tok):
    def script(text, turn):
        return "<answer>gave up</answer>" if ANSWER_NOW in text else "I will just ramble."

    trajs, _ = run(tok, script, [Task("t", "What is key alpha?")], group_size=1, max_turns=3)
    t = trajs[0]
    assert t.status == "answered" and t.answer == "gave up"
    assert t.format_errors == 3 and t.turns == 4 and not t.tool_calls
    assert "[format error] the turn has neither a <tool_call> nor an <answer>" in t.response


def test_turn_limit_without_answer(tok):
    trajs, _ = run(tok, lambda text, turn: "still thinking", [Task("t", "What is key alpha?")], group_size=1,
                   max_turns=2)
    assert trajs[0].status == "max_turns" and trajs[0].answer is None and trajs[0].turns == 3


def test_tool_errors_are_observations(tok):
    def script(text, turn):
        if turn == 0:
            return '<tool_call>{"name": "browse", "arguments": {}}</tool_call>'
        if turn == 1:
            return '<tool_call>{"name": "lookup", "arguments": {"key": 5}}</tool_call>'
        if turn == 2:
            return '<tool_call>{"name": "lookup", "arguments": </tool_call>'
        return "<answer>done</answer>"

    t = run(tok, script, [Task("t", "What is key alpha?")], group_size=1)[0][0]
    assert t.status == "answered" and t.turns == 4
    assert "[tool error] unknown tool 'browse'" in t.response
    assert "[tool error] lookup: bad arguments" in t.response
    assert "[format error] the tool call is not valid JSON" in t.response
    assert [c.ok for c in t.tool_calls] == [False, False]


def test_context_limit(tok):
    prompt_len = len(ChatTemplate(tok).prompt("What is key alpha?", "Answer questions."))
    trajs, _ = run(tok, lambda text, turn: "blah " * 40, [Task("t", "What is key alpha?")], group_size=1,
                   max_context=prompt_len + 30)
    t = trajs[0]
    assert t.status == "max_context" and len(t.token_ids) <= prompt_len + 30


def test_prompt_longer_than_context_is_an_error(tok):
    with pytest.raises(ValueError, match="exceeds max_context"):
        run(tok, good_script, [Task("t", "What is key alpha? " * 50)], group_size=1, max_context=64)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list('<>/{}":,[] \nabcname') + ["<tool_call>", "</tool_call>", "<answer>",
                                                                "</answer>", "<code>", "</code>", '"arguments"']),
                max_size=40).map("".join))
def test_parse_turn_never_raises(text):
    assert isinstance(parse_turn(text), (ToolCall, Answer, Malformed))


def test_parse_turn_cases():
    assert parse_turn('<think>x</think><tool_call>{"name": "search", "arguments": {"query": ["a"]}}</tool_call>') == \
        ToolCall("search", {"query": ["a"]})
    assert parse_turn("<answer> Paris </answer>") == Answer("Paris")
    assert parse_turn('<tool_call>{"name": "python", "arguments": {}}\n<code>\nprint(1)\n</code></tool_call>') == \
        ToolCall("python", {"code": "print(1)"})
    assert isinstance(parse_turn('<tool_call>{"name": "x"'), Malformed)
    assert isinstance(parse_turn('<tool_call>["x"]</tool_call>'), Malformed)
