"""Generator: greedy parity with transformers' generate, continuous batching, sessions, sampling law."""

import math

import pytest
import torch

from sailor_engine.model import ModelConfig, Transformer, load_hf
from sailor_engine.model.transformer import FusedWeights
from sailor_engine.rollout.generator import Generator, SamplingParams, sample_from

transformers = pytest.importorskip("transformers")

PROMPT_LENS = [3, 11, 1, 7, 20, 5]


def prompts(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """The same random weights in transformers and in the engine."""
    cfg = transformers.Qwen2Config(vocab_size=83, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # sharper distributions than the 0.02 init, so greedy paths are not all ties
        for p in ref.parameters():
            p.mul_(8.0 if p.ndim > 1 else 1.0)
    path = tmp_path_factory.mktemp("hf")
    ref.save_pretrained(path)
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    return ref, load_hf(path).eval()


def test_greedy_matches_transformers_generate(hf_pair, cpu_path):
    ref, ours = hf_pair
    ps = prompts(83)
    gen = Generator(ours, max_batch=4, max_seq_len=64)  # fewer rows than prompts: continuous batching
    outs = gen.generate(ps, SamplingParams(greedy=True, max_new_tokens=12))
    for p, out in zip(ps, outs):
        ids = torch.tensor([p])  # explicit mask: HF would otherwise treat token pad_token_id as padding
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)[0, len(p):]
        want = want.tolist()
        assert out.token_ids == want
        assert out.finish_reason == "length"


def test_logprobs_are_the_models_log_softmax(hf_pair, cpu_path):
    _, ours = hf_pair
    ps = prompts(83, seed=1)
    for params in (SamplingParams(temperature=0.7, max_new_tokens=9, seed=5),
                   SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=9, seed=6),
                   SamplingParams(greedy=True, max_new_tokens=9)):
        outs = Generator(ours, max_batch=3, max_seq_len=64).generate(ps, params)
        T = 1.0 if params.is_greedy else params.temperature
        for p, out in zip(ps, outs):
            ids = torch.tensor([p + out.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(ours(ids)[0].double() / T, -1)
            want = logp[len(p) - 1 : -1].gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(out.logprobs, dtype=torch.float64), want, atol=2e-5, rtol=0)
            assert max(out.logprobs) <= 0


def test_continuous_batching_equals_one_at_a_time_and_seeds_reproduce(hf_pair, cpu_path):
    _, ours = hf_pair
    ps = prompts(83, seed=2)
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=123)
    batched = Generator(ours, max_batch=4, max_seq_len=64).generate(ps, params)
    single = Generator(ours, max_batch=1, max_seq_len=64).generate(ps, params)
    again = Generator(ours, max_batch=6, max_seq_len=64).generate(ps, params)
    for a, b, c in zip(batched, single, again):
        assert a.token_ids == b.token_ids == c.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    other = Generator(ours, max_batch=4, max_seq_len=64).generate(ps, SamplingParams(max_new_tokens=10, seed=124))
    assert any(a.token_ids != o.token_ids for a, o in zip(batched, other))


def test_greedy_and_sampled_requests_share_a_batch(hf_pair, cpu_path):
    """A batch mixing greedy and sampled rows: each row gets what it would get alone."""
    _, ours = hf_pair
    ps = prompts(83, seed=8)
    greedy, sampled = SamplingParams(greedy=True, max_new_tokens=7), SamplingParams(max_new_tokens=7)
    gen = Generator(ours, max_batch=len(ps), max_seq_len=64)
    sessions = [gen.open_session() for _ in ps]
    for i, (s, p) in enumerate(zip(sessions, ps)):
        gen.submit(s, p, greedy if i % 2 else sampled, rng=torch.Generator().manual_seed(40 + i))
    got = {s.id: c for s, c in _drain(gen)}
    for i, (s, p) in enumerate(zip(sessions, ps)):
        alone = Generator(ours, max_batch=1, max_seq_len=64)
        a = alone.open_session()
        alone.submit(a, p, greedy if i % 2 else sampled, rng=torch.Generator().manual_seed(40 + i))
        (_, want), = _drain(alone)
        assert got[s.id].token_ids == want.token_ids
        torch.testing.assert_close(torch.tensor(got[s.id].logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0)


def test_session_resume_prefills_only_appended_tokens(hf_pair):
    """Turn 1 stops; a 'tool response' is appended; turn 2 continues from the cache, equal to a cold start."""
    _, ours = hf_pair
    p = prompts(83, seed=3)[4]
    tool = [5, 6, 7, 8]
    params = SamplingParams(greedy=True, max_new_tokens=6)
    gen = Generator(ours, max_batch=2, max_seq_len=64)
    s = gen.open_session()
    gen.submit(s, p, params)
    (_, turn1), = _drain(gen)
    before = gen.stats["prefill_tokens"]
    gen.submit(s, tool, params)
    (_, turn2), = _drain(gen)
    # only the last generated token of turn 1 (never fed) plus the appended tokens are prefilled
    assert gen.stats["prefill_tokens"] - before == 1 + len(tool) - 1
    cold = Generator(ours, max_batch=1, max_seq_len=64).generate([p + turn1.token_ids + tool], params)[0]
    assert turn2.token_ids == cold.token_ids


def test_eviction_reprefills_and_stays_correct(hf_pair, cpu_path):
    _, ours = hf_pair
    ps = prompts(83, seed=4)[:3]
    params = SamplingParams(greedy=True, max_new_tokens=4)
    gen = Generator(ours, max_batch=1, max_seq_len=64, num_slots=1)
    sessions = [gen.open_session() for _ in ps]
    first = {}
    for s, p in zip(sessions, ps):
        gen.submit(s, p, params)
        (_, c), = _drain(gen)
        first[s.id] = c.token_ids
    for s in sessions:  # each resume needs the single row, evicting the previous session
        gen.submit(s, [1, 2], params)
        (_, c), = _drain(gen)
        cold = Generator(ours, max_batch=1, max_seq_len=64).generate([s.context[: -len(c.token_ids)]], params)[0]
        assert c.token_ids == cold.token_ids
    assert gen.stats["evictions"] >= 2


def test_a_session_without_a_row_does_not_block_those_holding_one(hf_pair):
    """Two rows, both held by sessions whose next requests queue behind a third session's: the third
    waits, the two run (they once waited behind it forever), and then it evicts one of them."""
    _, ours = hf_pair
    ps = prompts(83, seed=5)[:3]
    params = SamplingParams(greedy=True, max_new_tokens=3)
    gen = Generator(ours, max_batch=2, max_seq_len=64, num_slots=2)
    a, b, c = (gen.open_session() for _ in ps)
    for s, p in ((a, ps[0]), (b, ps[1])):
        gen.submit(s, p, params)
    assert len(_drain(gen)) == 2  # a and b now hold both rows, idle
    gen.submit(c, ps[2], params)  # no row for c: every row is held...
    gen.submit(a, [1, 2], params)  # ...by sessions queued behind it
    gen.submit(b, [3], params)
    done = {}
    for _ in range(50):
        done.update({s.id: out for s, out in gen.step()})
        if not gen.has_work():
            break
    assert set(done) == {a.id, b.id, c.id}
    want = Generator(ours, max_batch=1, max_seq_len=64).generate([ps[2]], params)[0]
    assert done[c.id].token_ids == want.token_ids


@pytest.mark.parametrize("case", ["short", "long-rows", "two-threads"])
def test_a_row_does_not_depend_on_its_batch(case, request, cpu_path):
    """Bit for bit: the RL trainer's trajectories must not depend on which rank or batch sampled them.
    Eight 3-turn sampled sessions (prompt, then two observations each), all in one Generator or one
    per Generator (as they would run alone on a rank): a row alone in its step once ran its GEMMs as
    GEMVs, which round differently (log-prob differences ~5e-5 here, enough to flip sampled tokens).
    long-rows: sessions 0 and 1 start from 900 and 500 tokens: in one batch, session 1's attention
    contracts over session 0's longer span, which MKL once rounded differently past ~350 positions.
    two-threads: long rows, the demo's widths (SwiGLU 352, head_dim 32) and two intra-op threads, where
    ATen splits an elementwise op between threads at an offset that follows the step's token count, and
    each thread's tail goes through the scalar exp, which rounds unlike the vector one.
    Each case also runs the eight sessions on three cache rows with late observations (evictions)."""
    from sailor_engine.model import ModelConfig, Transformer

    long_rows = case != "short"
    demo = case == "two-threads"
    width = dict(hidden_size=128, intermediate_size=352) if demo else dict(hidden_size=64, intermediate_size=128)
    if demo:
        request.getfixturevalue("two_threads")
    cfg = ModelConfig(family="qwen2", qkv_bias=True, vocab_size=384, **width,
                      num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for w in model.parameters():
            if w.ndim > 1:
                w.mul_(4.0)

    def ids(n: int, seed: int) -> list[int]:
        return torch.randint(0, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()

    evictions = []

    def run(groups: list[list[int]], rows: int | None = None, delay: bool = False) -> dict[int, tuple[list, list]]:
        """rows: cache rows per Generator (default one per session); delay: each observation comes back
        1-5 steps after its turn ends (a tool's latency), so parked sessions lose their rows."""
        out = {}
        for grp in groups:
            gen = Generator(model, max_batch=rows or len(grp), max_seq_len=1024)
            sess, turn, rngs, pending, clock = {}, {}, {}, [], 0
            for e in grp:
                s = gen.open_session()
                sess[s.id], turn[e], rngs[e], out[e] = e, 0, torch.Generator().manual_seed(7 + e), ([], [])
                n = {0: 900, 1: 500}.get(e, 20 + 7 * e) if long_rows else 20 + 7 * e
                gen.submit(s, ids(n, 100 + e), SamplingParams(max_new_tokens=12 + 3 * e), rng=rngs[e])
            while gen.has_work() or pending:
                clock += 1
                for s, c in gen.step() if gen.has_work() else ():
                    e = sess[s.id]
                    out[e][0].extend(c.token_ids)
                    out[e][1].extend(c.logprobs)
                    turn[e] += 1
                    if turn[e] < 3:
                        pending.append((clock + (1 + (3 * e + turn[e]) % 5 if delay else 0), s, e))
                for item in [p for p in pending if p[0] <= clock]:
                    pending.remove(item)
                    _, s, e = item
                    gen.submit(s, ids(5 + 13 * ((e + turn[e]) % 4), 1000 * e + turn[e]),
                               SamplingParams(max_new_tokens=12 + 3 * e), rng=rngs[e])
            evictions.append(gen.stats["evictions"])
        return out

    together = run([list(range(8))])
    assert run([[e] for e in range(8)]) == together
    assert run([[0, 2, 4, 6], [1, 3, 5, 7]]) == together
    # three rows for eight sessions, observations late: parked sessions are evicted and re-prefill
    # their whole history when they resume, which must give what the incremental decode gave
    assert run([list(range(8))], rows=3, delay=True) == together
    assert evictions[-1] >= 5


def test_greedy_logsumexp_equals_torchs_on_peaked_logits():
    """The greedy path's log-sum-exp clamps exp's arguments (subnormal exps are ~50x slower on x86):
    bit for bit torch.logsumexp, from flat to very peaked rows, with masked (-inf) logits too."""
    from sailor_engine.rollout.generator import _logsumexp

    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 30.0, 1000.0):
        for V in (83, 1211, 4096):
            z = torch.randn(16, V, generator=g) * scale
            z[::3, ::5] = -math.inf
            assert torch.equal(_logsumexp(z, z.max(-1).values), torch.logsumexp(z, -1)), (scale, V)


def test_stop_tokens_and_strings(hf_pair):
    _, ours = hf_pair
    p = prompts(83, seed=5)[1]
    free = Generator(ours, max_batch=1, max_seq_len=64).generate([p], SamplingParams(greedy=True, max_new_tokens=10))[0]
    stop_at = free.token_ids[3]
    k = free.token_ids.index(stop_at)
    out = Generator(ours, max_batch=1, max_seq_len=64).generate(
        [p], SamplingParams(greedy=True, max_new_tokens=10, stop_token_ids=(stop_at,)))[0]
    assert out.token_ids == free.token_ids[: k + 1] and out.finish_reason == "stop" and out.stop == stop_at
    detok = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    target = detok(free.token_ids[4:6])
    gen = Generator(ours, max_batch=1, max_seq_len=64, detokenize=detok)
    out = gen.generate([p], SamplingParams(greedy=True, max_new_tokens=10, stop_strings=(target,)))[0]
    assert detok(out.token_ids).endswith(target) and out.stop == target
    with pytest.raises(ValueError, match="detokenize"):
        Generator(ours, max_batch=1, max_seq_len=64).generate([p], SamplingParams(stop_strings=("x",)))


def test_context_limits_and_bad_params(hf_pair):
    _, ours = hf_pair
    gen = Generator(ours, max_batch=2, max_seq_len=16)
    out = gen.generate([list(range(12))], SamplingParams(greedy=True, max_new_tokens=50))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    with pytest.raises(ValueError, match="no room"):
        gen.generate([list(range(16))], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="num_slots"):
        Generator(ours, max_batch=4, num_slots=2)


def test_sampling_law_chi_square():
    """Empirical frequencies of sample_from match the truncated, renormalised distribution."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 12, generator=g, dtype=torch.float64) * 1.5
    T, top_p, top_k, n = 0.7, 0.85, 6, 40000
    logp = torch.log_softmax(logits / T, -1).expand(n, -1)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    draws = sample_from(logp, u, torch.full((n,), top_p, dtype=torch.float64), torch.full((n,), top_k))
    p = torch.softmax(logits[0] / T, -1)
    order = p.argsort(descending=True)
    kept, mass = [], 0.0
    for i in order.tolist()[:top_k]:  # brute force: smallest prefix reaching top_p
        kept.append(i)
        mass += p[i].item()
        if mass >= top_p:
            break
    expected = torch.zeros(12, dtype=torch.float64)
    expected[kept] = p[kept] / p[kept].sum()
    counts = torch.bincount(draws, minlength=12).double()
    assert counts[expected == 0].sum() == 0
    e = expected[kept] * n
    chi2 = ((counts[kept] - e) ** 2 / e).sum().item()
    df = len(kept) - 1
    # Wilson-Hilferty approximation of the 0.999 quantile of chi2(df)
    z = 3.09
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < crit, (chi2, crit)


FUSED_CFGS = {  # q/k/v bias + GQA (Qwen2), per-head q/k norm + untied head (Qwen3), no biases at all (Llama)
    "qwen2": ModelConfig(family="qwen2", vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                         num_heads=6, num_kv_heads=2, qkv_bias=True),
    "qwen3": ModelConfig(family="qwen3", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=4, head_dim=16, qk_norm=True, tie_word_embeddings=False),
    "llama": ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=1, o_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("name", FUSED_CFGS)
def test_fused_weights_match_the_module_path(name):
    """Prefill of ragged chunks into scattered slots, then decode steps: FusedWeights' forward and
    logits against the nn.Module forward, each step on a copy of the same cache."""
    cfg = FUSED_CFGS[name]
    model = Transformer(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(1)).eval()
    fused = FusedWeights(model)
    g = torch.Generator().manual_seed(2)
    slots = torch.tensor([3, 0, 2])
    a, b = model.new_kv_cache(4, 24), model.new_kv_cache(4, 24)
    lens = [5, 1, 9]
    ids = torch.randint(0, cfg.vocab_size, (sum(lens),), generator=g)
    cu = torch.tensor([0] + lens).cumsum(0)
    with torch.inference_mode():
        for step in range(4):
            want = model.logits(model.forward_cached(ids, cu, a, slots))
            got = fused.logits(model.forward_cached(ids, cu, b, slots, weights=fused))
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(b.k, a.k, atol=2e-5, rtol=1e-5)
            live = slots[: 3 - step % 2]  # decode, sometimes with a slot sitting out (non-contiguous span)
            ids = torch.randint(0, cfg.vocab_size, (len(live),), generator=g)
            cu, slots = torch.arange(len(live) + 1), live
    assert a.lengths.tolist() == b.lengths.tolist()


@pytest.mark.parametrize("fused", [False, True])
def test_mixed_step_of_resumes_decodes_and_new_prompts_matches_full_forward(fused):
    """One forward_cached call mixing a resumed chunk, a one-token decode, an empty chunk, a new
    prompt and a longer resume (the agent loop's steps): each token's logits equal the plain padded
    forward over its whole sequence."""
    cfg = FUSED_CFGS["qwen2"]
    model = Transformer(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(3)).eval()
    weights = FusedWeights(model) if fused else None
    logits = weights.logits if fused else model.logits
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (10, 14, 6, 7, 13, 5)]
    slots = torch.tensor([7, 1, 3, 2, 0, 4])
    cache = model.new_kv_cache(8, 24)
    # (sequence, tokens this call): call 1 prefills five rows; call 2 mixes every kind of chunk, with
    # two one-token rows (batched apart from the others); calls 3 and 4 decode two rows, adjacent
    # (slots 1, 0: read in place in the span) and far apart (slots 7, 0: copied out of it)
    calls = [[(0, 4), (1, 1), (2, 6), (4, 3), (5, 3)], [(0, 5), (1, 1), (2, 0), (3, 7), (4, 8), (5, 1)],
             [(1, 1), (4, 1)], [(0, 1), (4, 1)]]
    fed = [0] * len(seqs)
    got = [[] for _ in seqs]
    with torch.inference_mode():
        for call in calls:
            ids = torch.cat([seqs[i][fed[i] : fed[i] + n] for i, n in call])
            cu = torch.tensor([0] + [n for _, n in call]).cumsum(0)
            h = model.forward_cached(ids, cu, cache, slots[[i for i, _ in call]], weights=weights)
            for (i, n), chunk in zip(call, logits(h).split([n for _, n in call])):
                got[i].append(chunk)
                fed[i] += n
        for i, s in enumerate(seqs):
            want = model(s[None])[0, : fed[i]]
            torch.testing.assert_close(torch.cat(got[i]), want, atol=2e-5, rtol=1e-5)


def test_fused_copies_follow_in_place_weight_updates(hf_pair):
    """The trainer updates the weights in place between rollouts: an optimizer step must reach the
    fused copies of a Generator built before it (version counters), and generation must equal the
    module path's on the new weights."""
    _, ours = hf_pair
    model = Transformer(ours.cfg)
    model.load_state_dict(ours.state_dict())
    model.eval()
    ps = prompts(83, seed=7)
    params = SamplingParams(greedy=True, max_new_tokens=8)
    gen = Generator(model, max_batch=6, max_seq_len=64)
    assert gen.fused is not None  # CPU, plain Transformer: the fused path is the one under test
    before = gen.generate(ps, params)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    loss = model(torch.tensor([ps[4]])).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    after = gen.generate(ps, params)
    plain = Generator(model, max_batch=6, max_seq_len=64)
    plain.fused = None  # the nn.Module path
    want = plain.generate(ps, params)
    assert [c.token_ids for c in after] == [c.token_ids for c in want]
    for c, w in zip(after, want):
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(w.logprobs), atol=2e-5, rtol=0)
    assert [c.token_ids for c in after] != [c.token_ids for c in before]  # the update did change the policy


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_decode_graph_step_on_cpu_matches_transformers_and_the_eager_step(hf_pair, impl):
    """decode_graphs=True off CUDA runs the CUDA graphs' static step eagerly (rollout/decode_graph.py:
    batch buckets, padding rows on the scratch cache row, decode attention through the kernel's
    PyTorch path or the Triton kernel under the interpreter). Greedy output equals transformers'
    generate through continuous batching; sampled tokens equal the eager generator's, log-probs to
    rounding; a session resumes after being evicted; the scratch row never holds a session."""
    ref, ours = hf_pair
    ps = prompts(83, seed=9)
    gen = Generator(ours, max_batch=4, max_seq_len=64, decode_graphs=True)
    gen.graphs.attn_impl = impl
    assert gen.cache.num_slots == 5 and 4 not in gen.free_slots  # one scratch row past the sessions' rows
    outs = gen.generate(ps, SamplingParams(greedy=True, max_new_tokens=12))
    assert gen.stats["graph_steps"] > 0
    for p, out in zip(ps, outs):
        ids = torch.tensor([p])
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)[0, len(p):]
        assert out.token_ids == want.tolist()
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=10, seed=11)
    sampled = gen.generate(ps, params)
    eager = Generator(ours, max_batch=4, max_seq_len=64, decode_graphs=False).generate(ps, params)
    for a, b in zip(sampled, eager):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=2e-5, rtol=0)
    assert int(gen.cache.lengths[4]) == 0

    one = Generator(ours, max_batch=1, max_seq_len=64, num_slots=1, decode_graphs=True)
    one.graphs.attn_impl = impl
    greedy = SamplingParams(greedy=True, max_new_tokens=4)
    sessions = [one.open_session() for _ in ps[:2]]
    for s, p in zip(sessions, ps):
        one.submit(s, p, greedy)
        _drain(one)
    s = sessions[0]  # its row was taken by the second session: re-prefilled, then decoded through the graph step
    one.submit(s, [1, 2], greedy)
    (_, c), = _drain(one)
    cold = Generator(ours, max_batch=1, max_seq_len=64).generate([s.context[: -len(c.token_ids)]], greedy)[0]
    assert c.token_ids == cold.token_ids and one.stats["evictions"] >= 1


def test_decode_graphs_refuse_what_they_cannot_run(hf_pair):
    _, ours = hf_pair

    class Sharded(Transformer):  # stands in for a tensor-parallel model: fusable() says no
        pass

    tp = Sharded(ours.cfg)
    tp.tp = object()
    with pytest.raises(ValueError, match="decode_graphs needs a plain single-device Transformer"):
        Generator(tp, max_batch=2, max_seq_len=32, decode_graphs=True)
    assert Generator(ours, max_batch=2, max_seq_len=32).graphs is None  # auto: CUDA only
    from sailor_engine.rollout.decode_graph import DecodeGraphs, buckets

    with pytest.raises(ValueError, match="capture needs a CUDA cache"):
        DecodeGraphs(ours, ours.new_kv_cache(3, 32), scratch_slot=2, max_batch=2)
    with pytest.raises(ValueError, match="scratch_slot 3 is not a row"):
        DecodeGraphs(ours, ours.new_kv_cache(3, 32), scratch_slot=3, max_batch=2, capture=False)
    assert buckets(1) == [1] and buckets(8) == [1, 2, 4, 8] and buckets(30) == [1, 2, 4, 8, 16, 24, 30]


@pytest.mark.gpu
def test_cuda_graph_replay_equals_the_eager_static_step(hf_pair):
    """On a GPU: the captured graph of each bucket replays exactly what the same static step computes
    eagerly (same kernels, same shapes: bit for bit), for several steps and bucket sizes; greedy
    generation with graphs equals generation without them and transformers' generate."""
    ref, ours = hf_pair
    model = Transformer(ours.cfg).cuda().eval()
    model.load_state_dict(ours.state_dict())
    ps = prompts(83, seed=10)
    runs = {}
    for graphs in (True, False):
        gen = Generator(model, max_batch=4, max_seq_len=64, decode_graphs=graphs)
        runs[graphs] = gen.generate(ps, SamplingParams(greedy=True, max_new_tokens=12))
        if graphs:
            assert gen.graphs.stats["captures"] >= 2 and gen.graphs.stats["replays"] > 0
    for a, b, p in zip(runs[True], runs[False], ps):
        assert a.token_ids == b.token_ids
        ids = torch.tensor([p])
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)[0, len(p):]
        assert a.token_ids == want.tolist()
    from sailor_engine.rollout.decode_graph import DecodeGraphs

    caches = [model.new_kv_cache(5, 64) for _ in range(2)]
    live = DecodeGraphs(model, caches[0], scratch_slot=4, max_batch=4)
    eager = DecodeGraphs(model, caches[1], scratch_slot=4, max_batch=4, capture=False)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for step in range(6):
            R = 1 + step % 4
            ids = torch.randint(0, 83, (R,), generator=g).cuda()
            slots = torch.randperm(4, generator=g)[:R].cuda()
            assert torch.equal(live(ids, slots), eager(ids, slots)), step
    a, b = caches  # the sessions' rows; the scratch row is written by warm-ups and padding alone
    assert torch.equal(a.k[:, :4], b.k[:, :4]) and torch.equal(a.v[:, :4], b.v[:, :4])
    assert torch.equal(a.lengths, b.lengths)


def _drain(gen):
    done = []
    while gen.has_work():
        done.extend(gen.step())
    return done
