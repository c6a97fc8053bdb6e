"""HttpJudge against a loopback OpenAI-compatible stub server; judge failures fall back to exact match."""

import asyncio
import json

import pytest

from sailor_engine.rl.config import AlgoConfig, JudgeConfig
from sailor_engine.rl.judge import HttpJudge, Judge, JudgeError, parse_verdict
from sailor_engine.rl.rewards import score_batch_async


class StubServer:
    """Minimal HTTP/1.1 chat-completions server on 127.0.0.1:<free port>; behaviour keyed by the prediction."""

    def __init__(self):
        self.requests, self.hits, self.in_flight, self.max_in_flight = [], {}, 0, 0

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/"
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            body = json.loads(await reader.readexactly(int(headers["content-length"])))
            self.requests.append((lines[0], headers, body))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            status, payload = await self._respond(body)
            self.in_flight -= 1
            data = payload.encode()
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _respond(self, body):
        pred = body["messages"][1]["content"].split("Predicted answer: ")[1].split("\n")[0]
        self.hits[pred] = n = self.hits.get(pred, 0) + 1
        def reply(text):
            return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
        if pred == "flaky" and n <= 2:
            return 503, "{}"
        if pred == "down":
            return 500, "{}"
        if pred == "slow":
            await asyncio.sleep(2.0)
        if pred == "forbidden":
            return 403, '{"error": "no"}'
        if pred == "badjson":
            return 200, "<html>"
        if pred == "babble":
            return reply("I think so")
        if pred.startswith("busy"):
            await asyncio.sleep(0.05)
        return reply("**Correct.**" if pred in ("the physicist Curie", "flaky", "slow") or pred.startswith("busy")
                     else "incorrect")


def _cfg(url, **kw):
    return JudgeConfig(base_url=url, model="judge-7b", timeout_s=0.5, **kw)


def test_http_judge_verdicts_retries_and_failures(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")

    async def main():
        async with StubServer() as srv:
            async with HttpJudge(_cfg(srv.url, api_key_env="JUDGE_KEY", max_retries=2), backoff_s=0.001) as judge:
                assert isinstance(judge, Judge)
                assert await judge.judge("Who?", "the physicist Curie", ["Marie Curie", "Madame Curie"]) is True
                assert await judge.judge("Who?", "Pierre Curie", ["Marie Curie"]) is False
                assert await judge.judge("Who?", "flaky", ["Marie Curie"]) is True  # 503, 503, then ok
                assert judge.stats == dict(requests=5, retries=2, failures=0)
                for pred, calls in [("down", 3), ("slow", 3), ("forbidden", 1), ("badjson", 1), ("babble", 1)]:
                    with pytest.raises(JudgeError):
                        await judge.judge("Who?", pred, ["Marie Curie"])
                    assert srv.hits[pred] == calls  # only transport errors, timeouts, 429 and 5xx are retried
                assert judge.stats["failures"] == 5
            line, headers, body = srv.requests[0]
            assert line == "POST /v1/chat/completions HTTP/1.1"
            assert headers["authorization"] == "Bearer sk-test"
            assert body["model"] == "judge-7b" and body["temperature"] == 0.0
            assert "Reference answer: Marie Curie\nAccepted aliases: Madame Curie" in body["messages"][1]["content"]

    asyncio.run(main())


def test_concurrency_is_bounded():
    async def main():
        async with StubServer() as srv:
            async with HttpJudge(_cfg(srv.url, max_concurrency=2)) as judge:
                verdicts = await asyncio.gather(*(judge.judge("q", f"busy{i}", ["a"]) for i in range(6)))
            assert verdicts == [True] * 6 and srv.max_in_flight == 2

    asyncio.run(main())


def test_score_batch_async_asks_only_where_em_fails_and_falls_back():
    cfg = AlgoConfig()
    texts = ["<answer>Marie Curie</answer>",            # EM: no judge call
             "<answer>the physicist Curie</answer>",    # judge: correct
             "<answer>Pierre Curie</answer>",           # judge: incorrect
             "<answer>down</answer>",                   # judge fails: EM fallback (wrong)
             "<answer>babble</answer>",                 # unparsable: EM fallback
             "no answer at all"]                        # no call
    answers = [["Marie Curie"]] * len(texts)

    async def main():
        async with StubServer() as srv:
            async with HttpJudge(_cfg(srv.url, max_retries=1), backoff_s=0.001) as judge:
                b = await score_batch_async(texts, answers, cfg, judge=judge, questions=["Who?"] * len(texts))
            return b, srv

    b, srv = asyncio.run(main())
    assert b.correct.tolist() == [True, True, False, False, False, False]
    assert b.rewards.tolist() == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.1, 0.0])
    assert b.stats["judge_calls"] == 4 and b.stats["judge_fallbacks"] == 2
    assert [s.judged for s in b.scores] == [False, True, True, False, False, False]  # fallbacks are not judged
    assert "Marie Curie" not in srv.hits and "no answer at all" not in srv.hits


def test_any_judge_object_and_unreachable_server():
    class Oracle:
        async def judge(self, question, prediction, answers):
            if prediction == "crash":
                raise RuntimeError("judge bug")
            return prediction.endswith("Curie")

    texts = ["<answer>Dr. Curie</answer>", "<answer>crash</answer>"]

    async def main():
        b1 = await score_batch_async(texts, [["Marie Curie"]] * 2, AlgoConfig(), judge=Oracle(), questions=["q"] * 2)
        async with HttpJudge(_cfg("http://127.0.0.1:9/v1", max_retries=0)) as judge:  # discard port: refused
            b2 = await score_batch_async(texts, [["Marie Curie"]] * 2, AlgoConfig(), judge=judge, questions=["q"] * 2)
        return b1, b2

    b1, b2 = asyncio.run(main())
    assert b1.correct.tolist() == [True, False] and b1.stats["judge_fallbacks"] == 1
    assert b2.correct.tolist() == [False, False] and b2.stats["judge_fallbacks"] == 2
    with pytest.raises(ValueError, match="questions"):
        asyncio.run(score_batch_async(texts, [["a"]] * 2, AlgoConfig(), judge=Oracle(), questions=["q"]))


@pytest.mark.parametrize("reply, verdict", [("correct", True), ("Incorrect.", False), ("**CORRECT**", True),
                                            ("`incorrect` - the dates differ", False), ("correct!", True)])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) is verdict


@pytest.mark.parametrize("reply", ["", "yes", "not correct", "incorrectly"])
def test_parse_verdict_rejects(reply):
    with pytest.raises(JudgeError, match="unparsable"):
        parse_verdict(reply)


def test_missing_api_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_JUDGE_KEY"):
        HttpJudge(_cfg("http://127.0.0.1:1/v1", api_key_env="NO_SUCH_JUDGE_KEY"))
