"""Rewards of ReAct trajectories: answer extraction, normalised EM / token F1, format check, presets.

Any model output gets a score; nothing here raises on malformed text (no answer, nested or
unclosed tags, truncated tool-call JSON, odd unicode all just score low). `text` is the response
part of a trajectory: everything after the prompt, tool responses included, chat control tokens
allowed (they are ignored).

    s = score(text, answers=["Marie Curie", "Maria Sklodowska-Curie"], cfg=algo_cfg)
    s.reward, s.correct, s.format_reason
    batch = score_batch(texts, answers_per_text, algo_cfg)            # offline metrics
    batch = await score_batch_async(texts, answers, algo_cfg, judge=HttpJudge(...), questions=qs)

Presets (AlgoConfig.reward): v1 = format_weight * format_ok + answer_weight * answer (WebSailor:
0.1 / 0.9; answer = correctness, or token F1 with answer_metric="f1"); v2 = 0/1 correctness minus
format_penalty for a malformed trajectory. Correctness is normalised exact match against any
alias, or the judge's verdict where EM fails (rl/judge.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sailor_engine.model.tokenizer import AGENT_TAGS
from sailor_engine.rl.config import AlgoConfig

# --------------------------------------------------------------------------------------------
# answer extraction and normalisation
# --------------------------------------------------------------------------------------------

_TAG_RE = re.compile("|".join(re.escape(t) for t in AGENT_TAGS))
_CONTROL_RE = re.compile(r"<\|im_start\|>[a-z]*\n?|<\|im_end\|>|<\|endoftext\|>")
_ARTICLES = frozenset(("a", "an", "the"))
# Han, kana and CJK compatibility ideographs: scripts written without spaces, one token per character.
_CJK_RE = re.compile("([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff])")


def _without_responses(text: str) -> str:
    """The text minus its tool responses (an unclosed one runs to the end): environment text, where a
    web page may well contain "<answer>". str.find per block: a regex with a lazy .*? is ~10x slower."""
    out, pos = [], 0
    while (start := text.find("<tool_response>", pos)) >= 0:
        out.append(text[pos:start])
        end = text.find("</tool_response>", start)
        if end < 0:
            return " ".join(out)
        out.append(" ")
        pos = end + len("</tool_response>")
    out.append(text[pos:])
    return "".join(out)


def extract_answer(text: str) -> str | None:
    """Content of the policy's last complete <answer>...</answer> (innermost if nested), or None.

    Stray agent tags inside are dropped; an unclosed trailing <answer> (cut off) does not count, nor
    does anything inside a tool response.
    """
    text = _without_responses(text)
    close = text.rfind("</answer>")
    if close < 0:
        return None
    start = text.rfind("<answer>", 0, close)
    if start < 0:
        return None
    content = _TAG_RE.sub(" ", text[start + len("<answer>"):close]).strip()
    return content or None


def _strip_marks(s: str) -> str:
    """Drop accents from Latin / Greek / Cyrillic letters (é -> e), keep marks that carry meaning
    elsewhere (Devanagari vowel signs, Hangul jamo are recomposed by the final NFC)."""
    out, base = [], ""
    for ch in unicodedata.normalize("NFKD", s):
        if unicodedata.category(ch) == "Mn" and base and ord(base) < 0x0530:
            continue
        out.append(ch)
        if unicodedata.category(ch) != "Mn":
            base = ch
    return unicodedata.normalize("NFC", "".join(out))


def _punct_to(ch: str) -> str:
    cat = unicodedata.category(ch)
    if cat == "Pd" or ch == "/":
        return " "  # "Jean-Paul" == "Jean Paul", "AC/DC" == "AC DC"
    if cat[0] in "PS":
        return ""  # "1,000" == "1000", "Don't" == "Dont" (SQuAD convention)
    return ch


def answer_tokens(s: str) -> list[str]:
    """Normalised tokens: NFKC, case-folded, accents off, punctuation off, articles off, CJK per char."""
    s = _strip_marks(unicodedata.normalize("NFKC", s).casefold())
    s = "".join(_punct_to(ch) for ch in s)
    s = _CJK_RE.sub(r" \1 ", s)
    return [w for w in s.split() if w not in _ARTICLES]


def normalize_answer(s: str) -> str:
    """The normalised answer string: answer_tokens joined by single spaces."""
    return " ".join(answer_tokens(s))


def _golds(answers: Sequence[str]) -> list[list[str]]:
    if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"answers must be a sequence of strings (answer and aliases), got {answers!r}")
    golds = [t for t in (answer_tokens(a) for a in answers) if t]
    if not golds:
        raise ValueError(f"answers has no alias that survives normalisation: {answers!r}")
    return golds


def exact_match(prediction: str | None, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised alias, else 0.0 (None scores 0)."""
    golds = _golds(answers)
    if prediction is None:
        return 0.0
    pred = answer_tokens(prediction)
    return float(any(pred == g for g in golds))


def token_f1(prediction: str | None, answers: Sequence[str]) -> float:
    """Best bag-of-tokens F1 between the normalised prediction and any alias (None scores 0)."""
    golds = _golds(answers)
    pred = answer_tokens(prediction) if prediction is not None else []
    best = 0.0
    for gold in golds:
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


# --------------------------------------------------------------------------------------------
# format
# --------------------------------------------------------------------------------------------

FORMAT_REASONS = ("ok", "no_answer", "empty_answer", "unclosed_tag", "nested_tag", "stray_tag",
                  "text_outside_tags", "bad_tool_call", "missing_tool_response", "order", "content_after_answer")
_OPENERS = {"<think>": "</think>", "<tool_call>": "</tool_call>", "<tool_response>": "</tool_response>",
            "<answer>": "</answer>"}


def _check_tool_call(body: str) -> bool:
    """Valid JSON object {"name": str, "arguments": {...}}; V2's python tool may append <code>...</code>."""
    if "<code>" in body:
        body, _, code = body.partition("<code>")
        if not code.rstrip().endswith("</code>") or _TAG_RE.search(code.rstrip()[: -len("</code>")]):
            return False
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeper than the parser goes
        return False
    return isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)


def check_format(text: str) -> str:
    """"ok" if the trajectory follows the ReAct grammar, else the first violation (FORMAT_REASONS).

    Grammar: step* answer, step = [<think>..</think>] <tool_call>json</tool_call>
    <tool_response>..</tool_response>; answer = [<think>..</think>] <answer>..</answer>; only
    whitespace between blocks and after the answer; no agent tag inside think / tool_call / answer
    (tool responses are the environment's and are not inspected).
    """
    text = _CONTROL_RE.sub("", text)
    parts, tags = _TAG_RE.split(text), _TAG_RE.findall(text)  # text = parts[0] tags[0] parts[1] ...
    if parts[0].strip():
        return "text_outside_tags"
    expect_response = thought = False
    i = 0
    while i < len(tags):
        tag = tags[i]
        if tag not in _OPENERS:
            return "stray_tag"
        close = _OPENERS[tag]
        j = i + 1  # find the closing tag; anything in between must be plain text (or <code> in a tool call)
        while j < len(tags) and tags[j] != close:
            if tag != "<tool_response>" and not (tag == "<tool_call>" and tags[j] in ("<code>", "</code>")):
                return "nested_tag"
            j += 1
        if j == len(tags):
            return "unclosed_tag"
        body = "".join(p + t for p, t in zip(parts[i + 1:j + 1], tags[i + 1:j + 1]))[: -len(close)]
        if expect_response != (tag == "<tool_response>"):
            return "missing_tool_response" if expect_response else "order"
        if tag == "<think>":
            if thought:
                return "order"
            thought = True
        elif tag == "<tool_call>":
            if not _check_tool_call(body):
                return "bad_tool_call"
            expect_response, thought = True, False
        elif tag == "<tool_response>":
            expect_response = False
        else:  # <answer>: must be the last block
            if not body.strip():
                return "empty_answer"
            if "".join(parts[j + 1:]).strip() or j + 1 < len(tags):
                return "content_after_answer"
            return "ok"
        if parts[j + 1].strip():
            return "text_outside_tags"
        i = j + 1
    return "no_answer"


def format_reward(text: str) -> float:
    """1.0 for a well-formed ReAct trajectory ending in an answer, else 0.0."""
    return float(check_format(text) == "ok")


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """The reward of one trajectory and what it was made of."""

    reward: float
    correct: bool  # answer verdict: EM against an alias, or the judge where EM failed
    answer_score: float  # the answer term: correctness, or token F1 (answer_metric="f1")
    format_reason: str  # "ok" or the first format violation
    answer: str | None  # the extracted final answer
    judged: bool = False  # the verdict came from the judge


def score(text: str, answers: Sequence[str], cfg: AlgoConfig, *, verdict: bool | None = None) -> Score:
    """Score one trajectory under cfg.reward; verdict, if given, is the judge's (EM wins if it matches)."""
    answer = extract_answer(text)
    em = exact_match(answer, answers) == 1.0
    correct = em or bool(verdict)
    reason = check_format(text)
    fmt = float(reason == "ok")
    if cfg.reward == "v1":
        answer_score = token_f1(answer, answers) if cfg.answer_metric == "f1" and not verdict else float(correct)
        reward = cfg.format_weight * fmt + cfg.answer_weight * answer_score
    else:
        answer_score = float(correct)
        reward = answer_score - cfg.format_penalty * (1.0 - fmt)
    return Score(reward, correct, answer_score, reason, answer, judged=verdict is not None and not em)


@dataclass(frozen=True)
class RewardBatch:
    """Scores of N trajectories as tensors (reshape to (num_groups, G) for advantages and DUPO)."""

    rewards: torch.Tensor  # (N,) float32
    correct: torch.Tensor  # (N,) bool
    format_ok: torch.Tensor  # (N,) bool
    scores: list[Score]
    stats: dict[str, int] = field(default_factory=dict)  # format reasons, judge calls / fallbacks


def _batch(scores: list[Score], judge_stats: dict[str, int]) -> RewardBatch:
    reasons = Counter(s.format_reason for s in scores)
    stats = {f"format_{r}": reasons.get(r, 0) for r in FORMAT_REASONS}
    stats.update(no_answer=sum(s.answer is None for s in scores), correct=sum(s.correct for s in scores),
                 **judge_stats)
    return RewardBatch(torch.tensor([s.reward for s in scores], dtype=torch.float32),
                       torch.tensor([s.correct for s in scores], dtype=torch.bool),
                       torch.tensor([s.format_reason == "ok" for s in scores], dtype=torch.bool), scores, stats)


def _check_batch(texts: Sequence[str], answers: Sequence[Sequence[str]]) -> None:
    if len(texts) != len(answers):
        raise ValueError(f"texts ({len(texts)}) and answers ({len(answers)}) must have one entry per trajectory")


def score_batch(texts: Sequence[str], answers: Sequence[Sequence[str]], cfg: AlgoConfig) -> RewardBatch:
    """Offline scores (no judge) of N trajectories; answers[i] = the answer and aliases of texts[i]."""
    _check_batch(texts, answers)
    if cfg.judge is not None:  # never drop a configured judge silently: it changes the rewards
        raise ValueError("algo.judge is set: score with score_batch_async(..., judge=HttpJudge(cfg.judge))")
    return _batch([score(t, a, cfg) for t, a in zip(texts, answers)], dict(judge_calls=0, judge_fallbacks=0))


async def score_batch_async(texts: Sequence[str], answers: Sequence[Sequence[str]], cfg: AlgoConfig, *,
                            judge, questions: Sequence[str]) -> RewardBatch:
    """Scores with an async judge (rl/judge.py Judge protocol) asked, concurrently, only where an answer
    was extracted and exact match failed. A judge call that raises falls back to exact match (the
    verdict stays EM's) and is counted in stats["judge_fallbacks"]; it never fails the batch."""
    _check_batch(texts, answers)
    if len(questions) != len(texts):
        raise ValueError(f"questions ({len(questions)}) and texts ({len(texts)}) must have one entry per trajectory")
    offline = [score(t, a, cfg) for t, a in zip(texts, answers)]
    ask = [i for i, s in enumerate(offline) if s.answer is not None and not s.correct]
    results = await asyncio.gather(*(judge.judge(questions[i], offline[i].answer, answers[i]) for i in ask),
                                   return_exceptions=True)
    scores, fallbacks = list(offline), 0
    for i, verdict in zip(ask, results):
        if isinstance(verdict, BaseException) or not isinstance(verdict, bool):
            if isinstance(verdict, asyncio.CancelledError):
                raise verdict
            fallbacks += 1
            continue
        scores[i] = score(texts[i], answers[i], cfg, verdict=verdict)
    return _batch(scores, dict(judge_calls=len(ask), judge_fallbacks=fallbacks))
