"""Rewards: normalisation table, EM / F1 with aliases, the ReAct format grammar, presets, malformed output."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sailor_engine.rl.config import AlgoConfig, JudgeConfig
from sailor_engine.rl.rewards import (FORMAT_REASONS, check_format, exact_match, extract_answer, normalize_answer,
                                      score, score_batch, token_f1)

CALL = '<tool_call>{"name": "search", "arguments": {"query": ["rare seed entity"]}}</tool_call>'
RESP = "<tool_response>1. A page\\nsnippet about <answer>a distractor</answer></tool_response>"
GOOD = f"<think>search first</think>\n{CALL}\n{RESP}\n<think>found it</think>\n<answer>Marie Curie</answer>"


@pytest.mark.parametrize("raw, norm", [
    ("Marie Curie", "marie curie"),
    ("  The   Eiffel\tTower.\n", "eiffel tower"),          # articles, whitespace, punctuation
    ("An apple a day", "apple day"),
    ("Jean-Paul Sartre", "jean paul sartre"),               # dashes split words
    ("Jean–Paul Sartre", "jean paul sartre"),               # en dash too
    ("AC/DC", "ac dc"),
    ("1,000,000", "1000000"),                               # SQuAD: punctuation removed
    ("Don't Stop", "dont stop"),
    ("São Paulo", "sao paulo"),                             # accents off (Latin)
    ("Crème Brûlée", "creme brulee"),
    ("STRASSE", "strasse"), ("Straße", "strasse"),          # casefold
    ("Ｔｏｋｙｏ　２０２０", "tokyo 2020"),                  # NFKC: full-width letters, digits, space
    ("ﬁnal", "final"),                                      # NFKC ligature
    ("e\u0301cole", "ecole"),                               # combining accent
    ("北京市", "北 京 市"), ("北京 市", "北 京 市"),            # CJK: one token per character
    ("東京タワー", "東 京 タ ワ ー"),
    ("हिन्दी", "हिन्दी"),                                      # Devanagari vowel signs kept
    ("서울특별시", "서울특별시"),                              # Hangul syllables intact
    ("the", ""), ("...", ""), ("", ""),
    ("$5.3 billion", "53 billion"),
    ("«Война и мир»", "воина и мир"),                       # Cyrillic: й -> и, like ё -> е
])
def test_normalisation_table(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_and_f1_with_aliases():
    answers = ["Maria Salomea Skłodowska-Curie", "Marie Curie", "Madame Curie"]
    assert exact_match("marie curie!", answers) == 1.0
    assert exact_match("MADAME CURIE", answers) == 1.0
    assert exact_match("Pierre Curie", answers) == 0.0
    assert exact_match(None, answers) == 0.0
    # F1 best over aliases: "pierre curie" vs "marie curie": p = r = 1/2.
    assert token_f1("Pierre Curie", answers) == pytest.approx(0.5)
    assert token_f1("Curie", answers) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert token_f1("the marie curie", answers) == 1.0
    assert token_f1(None, answers) == 0.0 and token_f1("", answers) == 0.0
    assert token_f1("北京", ["北京市"]) == pytest.approx(0.8)  # per-character tokens: p = 1, r = 2/3
    with pytest.raises(ValueError, match="answers"):
        exact_match("x", "Marie Curie")
    with pytest.raises(ValueError, match="answers has no alias"):
        exact_match("x", ["the", "..."])


@pytest.mark.parametrize("text, answer", [
    (GOOD, "Marie Curie"),
    ("no tags at all", None),
    ("<answer>a <answer>b</answer></answer>", "b"),                      # nested: innermost
    ("<answer>first</answer> then <answer>cut off", "first"),            # unclosed trailing answer ignored
    ("<answer>  </answer>", None),
    ("<answer>x<think>y</think>z</answer>", "x y z"),
    ("</answer><answer>", None),
    ("<answer>ok</answer><|im_end|>", "ok"),
    (f"{CALL}\n{RESP}", None),                                          # the page's "answer" is not the policy's
    (f"{CALL}<tool_response>cut off <answer>x</answer>", None),
    (f"<answer>mine</answer>{CALL}{RESP}", "mine"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("text, reason", [
    (GOOD, "ok"),
    ("<answer>42</answer>", "ok"),
    ("<think>easy</think><answer>42</answer>\n", "ok"),
    (f"<|im_start|>assistant\n{CALL}<|im_end|>\n<|im_start|>user\n{RESP}<|im_end|>\n<|im_start|>assistant\n"
     "<answer>42</answer><|im_end|>", "ok"),                                       # chat control tokens ignored
    ('<tool_call>{"name": "python", "arguments": {}}\n<code>print(6*7)</code></tool_call>'
     "<tool_response>42</tool_response><answer>42</answer>", "ok"),                # V2 python tool
    ("", "no_answer"),
    (f"<think>a</think>{CALL}", "no_answer"),                                      # cut at the turn limit
    ("<answer> </answer>", "empty_answer"),
    ("<think>never closed", "unclosed_tag"),
    ('<tool_call>{"name": "search", "argu', "unclosed_tag"),                       # truncated JSON, cut off
    ('<tool_call>{"name": "search", "argu</tool_call><tool_response>x</tool_response><answer>1</answer>',
     "bad_tool_call"),                                                             # truncated JSON, closed
    ('<tool_call>{"name": 3, "arguments": {}}</tool_call><tool_response>x</tool_response><answer>1</answer>',
     "bad_tool_call"),
    ('<tool_call>["search"]</tool_call><tool_response>x</tool_response><answer>1</answer>', "bad_tool_call"),
    ("<tool_call>" + "[" * 100_000 + "</tool_call><tool_response>x</tool_response><answer>1</answer>",
     "bad_tool_call"),                                                             # degenerate: parser recursion
    ("<answer>a <answer>b</answer></answer>", "nested_tag"),
    ("<think>plan <tool_call>{}</tool_call></think><answer>1</answer>", "nested_tag"),
    ("</think><answer>1</answer>", "stray_tag"),
    ("<code>x</code><answer>1</answer>", "stray_tag"),
    ("I think it is <answer>1</answer>", "text_outside_tags"),
    ("<think>a</think> so <answer>1</answer>", "text_outside_tags"),
    (f"{CALL}<answer>1</answer>", "missing_tool_response"),
    ("<tool_response>x</tool_response><answer>1</answer>", "order"),
    ("<think>a</think><think>b</think><answer>1</answer>", "order"),
    ("<answer>1</answer><answer>2</answer>", "content_after_answer"),
    ("<answer>1</answer> and more", "content_after_answer"),
])
def test_format_grammar(text, reason):
    assert reason in FORMAT_REASONS
    assert check_format(text) == reason


V1, V2 = AlgoConfig(), AlgoConfig(preset="sailor_v2", format_penalty=0.5)


@pytest.mark.parametrize("text, v1, v2", [
    (GOOD, 1.0, 1.0),                                                    # 0.1 * 1 + 0.9 * 1
    ("<answer>Pierre Curie</answer>", 0.1, 0.0),                         # well-formed, wrong
    ("Marie Curie is it <answer>marie curie</answer>", 0.9, 0.5),        # right, malformed
    ("nothing", 0.0, -0.5),
])
def test_presets(text, v1, v2):
    assert score(text, ["Marie Curie"], V1).reward == pytest.approx(v1)
    assert score(text, ["Marie Curie"], V2).reward == pytest.approx(v2)


def test_f1_answer_metric_and_judge_verdict():
    cfg = AlgoConfig(answer_metric="f1")
    s = score("<answer>Pierre Curie</answer>", ["Marie Curie"], cfg)
    assert s.reward == pytest.approx(0.1 + 0.9 * 0.5) and not s.correct
    judged = score("<answer>the physicist Curie</answer>", ["Marie Curie"], V1, verdict=True)
    assert judged.correct and judged.judged and judged.reward == pytest.approx(1.0)
    em = score("<answer>Marie Curie</answer>", ["Marie Curie"], V1, verdict=False)  # EM wins over the judge
    assert em.correct and not em.judged


def test_score_batch_tensors_and_stats():
    texts = [GOOD, "<answer>no</answer>", "garbage", "<think>x"]
    b = score_batch(texts, [["Marie Curie"]] * 4, V1)
    assert b.rewards.tolist() == pytest.approx([1.0, 0.1, 0.0, 0.0])
    assert b.correct.tolist() == [True, False, False, False] and b.format_ok.tolist() == [True, True, False, False]
    assert b.stats["format_ok"] == 2 and b.stats["format_text_outside_tags"] == 1
    assert b.stats["format_unclosed_tag"] == 1 and b.stats["no_answer"] == 2 and b.stats["correct"] == 1
    with pytest.raises(ValueError, match="texts .4. and answers .3."):
        score_batch(texts, [["x"]] * 3, V1)
    with_judge = AlgoConfig(judge=JudgeConfig(base_url="http://127.0.0.1:1/v1", model="m"))
    with pytest.raises(ValueError, match="algo.judge is set"):
        score_batch(texts, [["x"]] * 4, with_judge)


_pieces = st.sampled_from(["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
                           "</tool_response>", "<answer>", "</answer>", "<code>", "</code>", '{"name": "s", ',
                           '"arguments": {}}', "{", "}", "\"", " ", "\n", "Marie", "Curie", "é", "北京", "\u0301",
                           "\ud7ff", "\x00", "<|im_end|>", "<|im_start|>user\n"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_pieces, max_size=30).map("".join) | st.text(max_size=200))
def test_any_text_scores_without_exceptions(text):
    for cfg in (V1, V2, AlgoConfig(answer_metric="f1")):
        s = score(text, ["Marie Curie", "北京"], cfg)
        assert s.format_reason in FORMAT_REASONS
        assert -cfg.format_penalty <= s.reward <= 1.0
