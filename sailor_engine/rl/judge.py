"""LLM judges of answer correctness: the async protocol, and a client for OpenAI-compatible servers.

WebSailor's answer reward is an LLM judge's verdict. Anything with an async `judge(question,
prediction, answers) -> bool` is a judge; it may raise on failure: rewards.score_batch_async then
keeps the exact-match verdict and counts the fallback, so a flaky endpoint never stops training.

    async with HttpJudge(algo_cfg.judge) as judge:
        batch = await score_batch_async(texts, answers, algo_cfg, judge=judge, questions=questions)
    judge.stats   # requests, retries, failures

HttpJudge POSTs to {base_url}/chat/completions (vLLM, SGLang, OpenAI...) at temperature 0 and
expects a reply starting with "correct" or "incorrect"; requests are bounded by max_concurrency,
each retried max_retries times on transport errors, timeouts, 429 and 5xx, with exponential backoff.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import httpx

from sailor_engine.rl.config import JudgeConfig

SYSTEM_PROMPT = (
    "You grade answers to questions. Given a question, the reference answer (with accepted aliases) and "
    "a predicted answer, decide whether the prediction means the same thing as the reference. Ignore "
    "formatting, case and minor wording. Reply with exactly one word: correct or incorrect."
)


# Answers are short entities; a degenerate prediction is cut so that it cannot blow up the request.
MAX_PREDICTION_CHARS = 2000


class JudgeError(RuntimeError):
    """A judge could not produce a verdict (after its retries)."""


@runtime_checkable
class Judge(Protocol):
    async def judge(self, question: str, prediction: str, answers: Sequence[str]) -> bool:
        """True if `prediction` answers `question` as the reference `answers` (first = canonical) do."""
        ...


def judge_prompt(question: str, prediction: str, answers: Sequence[str]) -> str:
    aliases = "; ".join(answers[1:]) or "none"
    return (f"Question: {question}\nReference answer: {answers[0]}\nAccepted aliases: {aliases}\n"
            f"Predicted answer: {prediction[:MAX_PREDICTION_CHARS]}\nIs the predicted answer correct?")


def parse_verdict(reply: str) -> bool:
    """"correct" / "incorrect" (any case, surrounding punctuation or markdown allowed) -> bool."""
    word = reply.strip().strip("*_`'\".:!").split(maxsplit=1)
    word = word[0].strip("*_`'\".,:!").lower() if word else ""
    if word == "correct":
        return True
    if word == "incorrect":
        return False
    raise JudgeError(f"unparsable judge reply: {reply[:80]!r}")


class HttpJudge:
    """Judge through an OpenAI-compatible chat-completions endpoint (see module docstring)."""

    def __init__(self, cfg: JudgeConfig, *, client: httpx.AsyncClient | None = None, backoff_s: float = 0.5):
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        headers = {}
        if cfg.api_key_env is not None:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ValueError(f"algo.judge.api_key_env: environment variable {cfg.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        self._own_client = client is None
        self.client = client or httpx.AsyncClient(timeout=cfg.timeout_s)
        self.headers = headers
        self.backoff_s = backoff_s
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        self.stats = dict(requests=0, retries=0, failures=0)

    async def __aenter__(self) -> HttpJudge:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_client:
            await self.client.aclose()

    async def _once(self, body: dict) -> bool:
        self.stats["requests"] += 1
        resp = await self.client.post(self.url, json=body, headers=self.headers, timeout=self.cfg.timeout_s)
        if resp.status_code == 429 or resp.status_code >= 500:
            raise httpx.HTTPStatusError(f"judge HTTP {resp.status_code}", request=resp.request, response=resp)
        if resp.status_code != 200:  # other 4xx: the request itself is wrong, retrying will not help
            raise JudgeError(f"judge HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            reply = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise JudgeError(f"judge response is not a chat completion: {resp.text[:200]!r}") from e
        if not isinstance(reply, str):
            raise JudgeError(f"judge reply content is not a string: {reply!r}")
        return parse_verdict(reply)

    async def judge(self, question: str, prediction: str, answers: Sequence[str]) -> bool:
        body = dict(model=self.cfg.model, temperature=0.0, max_tokens=8, messages=[
            dict(role="system", content=SYSTEM_PROMPT),
            dict(role="user", content=judge_prompt(question, prediction, answers))])
        async with self._sem:
            attempt = 0
            while True:
                try:
                    return await self._once(body)
                except (httpx.TransportError, httpx.HTTPStatusError) as e:  # timeouts are TransportErrors
                    if attempt == self.cfg.max_retries:
                        self.stats["failures"] += 1
                        raise JudgeError(f"judge failed after {attempt + 1} attempt(s): {e!r}") from e
                    self.stats["retries"] += 1
                    await asyncio.sleep(self.backoff_s * 2**attempt)
                    attempt += 1
                except JudgeError:  # a wrong request or an unparsable reply: the same again would fail too
                    self.stats["failures"] += 1
                    raise
