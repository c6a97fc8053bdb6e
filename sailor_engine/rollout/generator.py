"""In-process generation on the trainer's own module: KV cache, continuous batching, sampling log-probs.

    gen = Generator(model, max_batch=32, max_seq_len=4096)
    outs = gen.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=512, stop_token_ids=(eos,)))
    outs[0].token_ids, outs[0].logprobs, outs[0].finish_reason      # "stop" | "length"

The model is used as is (same parameters: no copy, no weight sync), under torch.inference_mode.

Scheduling. Every sequence lives in a Session that owns a row (slot) of a slab KV cache. Each
`step()` runs ONE forward over up to `max_batch` running requests, mixing prefill chunks (new prompts,
or the tokens appended after a tool call) and one-token decodes in a single packed call. A request that
finishes leaves the batch at once; its session keeps the cache row ("parked"), so when the agent
appends a tool response and submits again only the new tokens are prefilled. Cache rows are
`num_slots >= max_batch`; when they run out, the least recently used parked session is evicted and
re-prefilled from its token history if it ever resumes (only slower: on CPU a token's numerics do not
depend on how its sequence was chunked, so the re-prefilled row is bit for bit the decoded one).

CUDA graphs. On CUDA a step in which every row decodes one token (most steps of a rollout) replays a
CUDA graph of the decode step for its batch-size bucket (rollout/decode_graph.py: static shapes, no
host synchronisation, captured at first use), so the host's launch overhead no longer paces decoding.
Steps with a prefill chunk run eagerly. `decode_graphs=False` turns graphs off.

Sampling. Per-request temperature / top-k / top-p / greedy, vectorised over the batch. Randomness
comes from one torch.Generator per request (seeded from SamplingParams.seed and the request's index),
so a seeded request draws the same tokens whatever else shares its batch. `logprobs` are
log_softmax(logits / T) at the sampled token over the full vocabulary, before top-k / top-p
truncation: exactly what the trainer recomputes with fused_linear_logprob(..., temperature=T), so the
importance ratio starts at 1 (T = 1 for greedy).

Speed on CPU. A decode step of a small model is ~30 small matmuls plus per-op overhead, so on CPU
the Generator runs the model through FusedWeights (q/k/v and gate/up fused, matrices pre-transposed;
copies refreshed from the parameters' version counters every step), which with the C kernels built
(sailor_engine.kernels.native) is one C call for all layers, KV-cache attention included. Where they
cannot be built the same steps run as torch ops (FusedWeights' layers, attention.py's batched
one-token path), equal up to rounding. So is sampling (kernels/cpu_sample.py: max, log-sum-exp and the
inverse-CDF draw in two or three passes over each row, against torch's five, each writing an (R, V)
tensor: 0.48 vs 1.39 ms for 128 rows of a 4096-token vocabulary, 13.7 vs 116 ms at 151936, on one
core: benchmarks/bench_sample.py), except for rows with
top-k / top-p truncation, whose batches take the torch path (a sort).
benchmarks/bench_generate.py measures it against transformers' generate.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import msgspec
import torch
from torch import Tensor

from sailor_engine.kernels import cpu_sample
from sailor_engine.model.transformer import FusedWeights, Transformer, fusable
from sailor_engine.rollout.decode_graph import DecodeGraphs

NATIVE_CPU_SAMPLER = True  # CPU sampling through kernels/cpu_sample.py where it applies (tests switch it off)


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus mass kept, in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    max_new_tokens: int = 256
    """Tokens generated per request at most (finish_reason "length")."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation stops after emitting one of these (the stop token is part of the output)."""
    stop_strings: tuple[str, ...] = ()
    """Generation stops once the decoded output contains one of these (needs the Generator's detokenize)."""
    greedy: bool = False
    """Argmax decoding regardless of temperature."""
    seed: int | None = None
    """Per-request RNG seed base; request i of a generate() call uses seed + i. None: the Generator's RNG."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


class Completion(msgspec.Struct):
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    stop: int | str | None = None
    """The stop token id or stop string that ended generation, if any."""


@dataclass(eq=False)
class Session:
    """One sequence across turns: its token history and (maybe) a KV-cache row holding a prefix of it."""

    id: int
    context: list[int] = field(default_factory=list)
    slot: int | None = None
    cached: int = 0  # (context + the running output)[:cached] is in the cache row
    last_used: int = 0
    busy: bool = False
    closed: bool = False


@dataclass(eq=False)
class _Request:
    session: Session
    params: SamplingParams
    rng: torch.Generator | None
    budget: int  # max new tokens, also bounded by the cache row
    out_ids: list[int] = field(default_factory=list)
    out_logps: list[float] = field(default_factory=list)
    done: Completion | None = None


class Generator:
    """Continuous-batching generator over a slab KV cache (see the module docstring)."""

    def __init__(self, model: Transformer, *, max_batch: int = 32, max_seq_len: int = 2048,
                 num_slots: int | None = None, detokenize: Callable[[list[int]], str] | None = None,
                 seed: int = 0, decode_graphs: bool | None = None):
        if max_batch < 1:
            raise ValueError(f"Generator: max_batch must be >= 1, got {max_batch}")
        num_slots = num_slots or max_batch
        if num_slots < max_batch:
            raise ValueError(f"Generator: num_slots ({num_slots}) must be >= max_batch ({max_batch})")
        self.model, self.max_batch, self.max_seq_len = model, max_batch, max_seq_len
        self.detokenize = detokenize
        self.device = model.embed_tokens.weight.device
        # CUDA: steps where every row decodes one token replay a CUDA graph (DecodeGraphs), whose
        # padding rows write to one extra cache row. decode_graphs=True elsewhere runs the same static
        # step eagerly (how the CPU tests cover it); False keeps every step eager.
        cuda = self.device.type == "cuda"
        if decode_graphs is None:
            decode_graphs = cuda and fusable(model)
        elif decode_graphs and not fusable(model):
            raise ValueError("Generator: decode_graphs needs a plain single-device Transformer (no tensor "
                             "parallelism, no DTensor parameters)")
        self.cache = model.new_kv_cache(num_slots + decode_graphs, max_seq_len)
        self.graphs = (DecodeGraphs(model, self.cache, scratch_slot=num_slots, max_batch=max_batch, capture=cuda)
                       if decode_graphs else None)
        self.free_slots = list(range(num_slots))[::-1]
        self.sessions: dict[int, Session] = {}
        self.waiting: list[_Request] = []
        self.running: list[_Request] = []
        self._ids = itertools.count()
        self._clock = itertools.count(1)
        self._rng = torch.Generator().manual_seed(seed)
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "evictions": 0, "graph_steps": 0}
        # CPU: fused, transposed copies of the matrices (see FusedWeights), checked for staleness every
        # step. Not on CUDA, where cuBLAS reads W.T natively and a second copy of a large model would
        # only cost memory; not for stand-ins and sharded models, which keep their own forward_cached.
        self.fused = FusedWeights(model) if self.device.type == "cpu" and fusable(model) else None

    # -- sessions ------------------------------------------------------------------------------
    def open_session(self) -> Session:
        s = Session(next(self._ids))
        self.sessions[s.id] = s
        return s

    def close_session(self, session: Session) -> None:
        """Release the session's cache row. Its pending request, if any, is dropped."""
        self.waiting = [r for r in self.waiting if r.session is not session]
        self.running = [r for r in self.running if r.session is not session]
        self._release(session)
        session.closed, session.busy = True, False
        self.sessions.pop(session.id, None)

    def submit(self, session: Session, tokens: Sequence[int], params: SamplingParams, *,
               rng: torch.Generator | None = None) -> None:
        """Append `tokens` to the session's context and queue a generation request continuing it."""
        if session.closed or session.busy:
            raise ValueError(f"session {session.id} is {'closed' if session.closed else 'already generating'}")
        session.context.extend(int(t) for t in tokens)
        room = self.max_seq_len - len(session.context)
        if room < 1:
            raise ValueError(f"session {session.id}: context of {len(session.context)} tokens leaves no room in "
                             f"max_seq_len={self.max_seq_len}")
        if not session.context:
            raise ValueError(f"session {session.id}: nothing to condition on (empty prompt)")
        session.busy = True
        if rng is None and params.seed is None and not params.is_greedy:
            rng = self._rng
        self.waiting.append(_Request(session, params, rng, min(params.max_new_tokens, room)))

    # -- the loop ------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @torch.inference_mode()
    def step(self) -> list[tuple[Session, Completion]]:
        """One packed forward over the running batch; returns the requests that finished in it."""
        self._admit()
        if not self.running:
            return []
        chunks = [self._pending(r) for r in self.running]
        lens = [len(c) for c in chunks]
        ids = torch.tensor([t for c in chunks for t in c], device=self.device)
        cu = torch.tensor([0] + lens, device=self.device).cumsum(0)
        slots = torch.tensor([r.session.slot for r in self.running], device=self.device)
        if self.graphs is not None and len(ids) == len(lens):  # every row decodes one token
            logits = self.graphs(ids, slots)
            self.stats["graph_steps"] += 1
        else:
            logits = self._forward(ids, cu, slots, chunked=len(ids) > len(lens))
        for r, n in zip(self.running, lens):
            r.session.cached += n
        tokens, logps = self._sample(logits)
        self.stats["steps"] += 1
        self.stats["decode_tokens"] += len(lens)
        self.stats["prefill_tokens"] += sum(lens) - len(lens)
        finished = []
        for r, t, lp in zip(self.running, tokens.tolist(), logps.tolist()):
            r.out_ids.append(t)
            r.out_logps.append(lp)
            r.done = self._check_stop(r)
            if r.done is not None:
                finished.append(r)
        for r in finished:
            self.running.remove(r)
            s = r.session
            s.context.extend(r.out_ids)  # the last token is in the context but not yet in the cache
            s.busy, s.last_used = False, next(self._clock)
        return [(r.session, r.done) for r in finished]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Generate one completion per prompt (sessions opened and closed internally)."""
        sessions = [self.open_session() for _ in prompts]
        for i, (s, p) in enumerate(zip(sessions, prompts)):
            rng = None if params.seed is None else torch.Generator().manual_seed(params.seed + i)
            self.submit(s, p, params, rng=rng)
        results: dict[int, Completion] = {}
        try:
            while len(results) < len(sessions):
                for s, c in self.step():
                    results[s.id] = c
        finally:
            for s in sessions:
                self.close_session(s)
        return [results[s.id] for s in sessions]

    # -- internals -----------------------------------------------------------------------------
    def _forward(self, ids: Tensor, cu: Tensor, slots: Tensor, chunked: bool) -> Tensor:
        """The eager step: forward_cached over the packed chunks -> (R, V) fp32 logits at each chunk's end."""
        if self.fused is None:
            hidden = self.model.forward_cached(ids, cu, self.cache, slots)
        else:
            self.fused.refresh()
            hidden = self.model.forward_cached(ids, cu, self.cache, slots, weights=self.fused)
        if chunked:  # some chunk is longer than one token: keep the last position of each
            hidden = hidden[cu[1:] - 1]
        return (self.model.logits(hidden) if self.fused is None else self.fused.logits(hidden)).float()

    def _admit(self) -> None:
        """Move waiting requests to running, in order, up to max_batch. A request whose session holds
        no cache row takes a free or evictable one; when every row is held by a busy session it stays
        waiting and the requests behind it whose sessions hold a row go ahead: with those rows'
        sessions queued behind it, waiting for them would wait forever."""
        i = 0
        while i < len(self.waiting) and len(self.running) < self.max_batch:
            r = self.waiting[i]
            s = r.session
            if s.slot is None:
                slot = self._take_slot()
                if slot is None:
                    i += 1
                    continue
                s.slot, s.cached = slot, 0
                self.cache.reset([slot])
            elif s.cached >= len(s.context):  # fully cached: re-feed the last token to get logits
                s.cached = len(s.context) - 1
                self.cache.lengths[s.slot] = s.cached
            self.waiting.pop(i)
            self.running.append(r)

    @staticmethod
    def _pending(r: _Request) -> list[int]:
        """Tokens of context + output not yet in the cache row: the chunk this step must feed."""
        s = r.session
        if s.cached < len(s.context):
            return s.context[s.cached:] + r.out_ids
        return r.out_ids[s.cached - len(s.context):]

    def _take_slot(self) -> int | None:
        if self.free_slots:
            return self.free_slots.pop()
        parked = [s for s in self.sessions.values() if s.slot is not None and not s.busy]
        if not parked:
            return None
        victim = min(parked, key=lambda s: s.last_used)
        slot = victim.slot
        victim.slot, victim.cached = None, 0  # re-prefilled from its history if it resumes
        self.stats["evictions"] += 1
        return slot

    def _release(self, s: Session) -> None:
        if s.slot is not None:
            self.cache.reset([s.slot])
            self.free_slots.append(s.slot)
            s.slot, s.cached = None, 0

    def _check_stop(self, r: _Request) -> Completion | None:
        p, t = r.params, r.out_ids[-1]
        if t in p.stop_token_ids:
            return Completion(r.out_ids, r.out_logps, "stop", t)
        if p.stop_strings:
            if self.detokenize is None:
                raise ValueError("SamplingParams.stop_strings needs Generator(detokenize=...)")
            window = max(map(len, p.stop_strings)) + 8  # tokens: enough to hold any stop string
            tail = self.detokenize(r.out_ids[-window:])
            for stop in p.stop_strings:
                if stop in tail:
                    return Completion(r.out_ids, r.out_logps, "stop", stop)
        if len(r.out_ids) >= r.budget:
            return Completion(r.out_ids, r.out_logps, "length")
        return None

    def _sample(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """logits: (R, V) fp32 -> tokens (R,), logprobs (R,)."""
        ps = [r.params for r in self.running]
        sampled = [i for i, p in enumerate(ps) if not p.is_greedy]
        u = torch.cat([torch.rand(1, generator=self.running[i].rng) for i in sampled]) if sampled else None
        # CPU: one C call (kernels/cpu_sample.py: temp 0 marks a greedy row), unless a row truncates
        # (top-k / top-p need a sort: sample_torch)
        if (NATIVE_CPU_SAMPLER and logits.device.type == "cpu" and cpu_sample.available()
                and all(ps[i].top_p == 1 and ps[i].top_k == 0 for i in sampled)):
            temp = torch.tensor([0.0 if p.is_greedy else p.temperature for p in ps])
            if u is not None and len(sampled) < len(ps):
                u = torch.zeros(len(ps)).index_copy_(0, torch.tensor(sampled), u)
            return cpu_sample.sample(logits, temp, torch.zeros(len(ps)) if u is None else u)
        return sample_torch(logits, ps, u)


def sample_torch(logits: Tensor, ps: Sequence[SamplingParams], u: Tensor | None) -> tuple[Tensor, Tensor]:
    """The sampling step as torch ops, any device: logits (R, V) fp32, one SamplingParams per row, u the
    uniforms of the sampled rows in order (None if every row is greedy) -> tokens (R,), log-probs (R,)."""
    sampled = [i for i, p in enumerate(ps) if not p.is_greedy]
    temps = [1.0 if p.is_greedy else p.temperature for p in ps]
    z = logits if all(t == 1.0 for t in temps) else logits / torch.tensor(temps, device=logits.device)[:, None]
    if not sampled:  # argmax, and log p = z_t - logsumexp(z): no (R, V) log-softmax written
        # max(-1) gives the first maximal index like argmax, with z_t alongside, ~3x faster on CPU
        z_t, tokens = z.max(-1)
        return tokens, z_t - _logsumexp(z, z_t)
    logp = torch.log_softmax(z, dim=-1)
    u = u.to(logits.device)
    top_p = torch.tensor([ps[i].top_p for i in sampled], device=logits.device)
    top_k = torch.tensor([ps[i].top_k for i in sampled], device=logits.device)
    if len(sampled) == len(ps):  # no greedy row: no argmax over the batch, no row gather
        tokens = sample_from(logp, u, top_p, top_k)
    else:
        tokens = logp.max(-1).indices  # greedy rows: the first maximal index, as argmax
        idx = torch.tensor(sampled, device=logits.device)
        tokens[idx] = sample_from(logp[idx], u, top_p, top_k)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


_EXP_MIN = -87.0  # exp(x) is subnormal below ~-87.3


def _logsumexp(z: Tensor, z_max: Tensor) -> Tensor:
    """torch.logsumexp(z, -1) given its row maxima, with exp's arguments clamped at _EXP_MIN: below it
    exp is subnormal, which costs x86 CPUs a microcode assist per element (50x slower on peaked logits,
    e.g. at a low temperature). Each clamped term adds at most 1.7e-38 to a sum >= 1: the same result."""
    return (z - z_max[:, None]).clamp_(min=_EXP_MIN).exp_().sum(-1).log_().add_(z_max)


def sample_from(logp: Tensor, u: Tensor, top_p: Tensor, top_k: Tensor) -> Tensor:
    """Inverse-CDF sampling with top-k / top-p truncation. logp: (R, V); u: (R,) uniforms in [0, 1).

    The kept set is the smallest prefix of the sorted distribution whose mass reaches top_p (the
    token that crosses the threshold is kept), intersected with the top_k most likely tokens.
    """
    probs = logp.exp()
    if bool((top_p < 1).any() | (top_k > 0).any()):
        probs, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(probs.shape[-1], device=probs.device)[None]
        before = probs.cumsum(-1) - probs  # mass strictly before each token
        keep = (before < top_p[:, None]) & ((top_k[:, None] == 0) | (rank < top_k[:, None]))
        probs = probs * keep
    else:
        order = None
    cdf = probs.cumsum(-1)
    # First index whose cdf exceeds u * total: never a zero-probability token, since cdf only
    # increases where probability is positive.
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=probs.shape[-1] - 1)[:, 0]
    return pick if order is None else order.gather(-1, pick[:, None])[:, 0]
