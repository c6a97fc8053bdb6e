"""The three forward modes agree: padded batch, packed varlen (every available backend) and KV-cache
decode. Reference: each sequence run alone through the padded forward."""

import pytest
import torch

from sailor_engine.model import ModelConfig, Transformer, backend_status, packed_positions, resolve_backend
from sailor_engine.model.attention import HAS_FLEX

CFGS = {
    "qwen2-gqa": ModelConfig(family="qwen2", vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                             num_heads=6, num_kv_heads=2, qkv_bias=True),
    "qwen3-mha": ModelConfig(family="qwen3", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=4, head_dim=16, qk_norm=True, tie_word_embeddings=False),
}
LENS = [5, 1, 17, 9]


def make(name, **kw):
    import msgspec

    cfg = msgspec.structs.replace(CFGS[name], **kw)
    torch.manual_seed(0)
    model = Transformer(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(1)).eval()
    seqs = [torch.randint(0, cfg.vocab_size, (n,)) for n in LENS]
    return model, seqs


def per_sequence_logits(model, seqs):
    with torch.no_grad():
        return torch.cat([model(s[None])[0] for s in seqs])


def cu_of(seqs):
    return torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name", CFGS)
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_equals_per_sequence(name, backend):
    if backend == "flex" and not HAS_FLEX:
        pytest.skip("FlexAttention unavailable")
    model, seqs = make(name, attn_backend=backend)
    with torch.no_grad():
        hidden = model.forward_packed(torch.cat(seqs), cu_of(seqs))
    assert hidden.shape == (sum(LENS), model.cfg.hidden_size)
    torch.testing.assert_close(model.logits(hidden), per_sequence_logits(model, seqs), atol=2e-5, rtol=1e-5)


@pytest.mark.gpu
def test_flex_and_sdpa_agree_forward_and_backward():
    """FlexAttention has no backward on CPU (torch raises), so gradient agreement is a GPU test."""
    grads = {}
    for backend in ("sdpa", "flex"):
        model, seqs = make("qwen2-gqa", attn_backend=backend)
        model.cuda().train()
        seqs = [s.cuda() for s in seqs]
        hidden = model.forward_packed(torch.cat(seqs), cu_of(seqs).cuda())
        (hidden.square().mean()).backward()
        grads[backend] = (hidden.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["flex"][0], grads["sdpa"][0], atol=1e-5, rtol=1e-5)
    for n, g in grads["sdpa"][1].items():
        torch.testing.assert_close(grads["flex"][1][n], g, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("name", CFGS)
def test_padded_batch_with_mask_equals_per_sequence(name):
    model, seqs = make(name)
    T = max(LENS)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):  # left padding, as batched generation uses
        ids[i, T - len(s):], mask[i, T - len(s):] = s, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(ids, position_ids=pos, attention_mask=mask)
    got = torch.cat([logits[i, T - len(s):] for i, s in enumerate(seqs)])
    torch.testing.assert_close(got, per_sequence_logits(model, seqs), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CFGS)
def test_kv_cache_prefill_then_decode_equals_full_forward(name, cpu_path):
    from sailor_engine.model.attention import native_cpu_attention

    model, seqs = make(name)
    want = per_sequence_logits(model, seqs).split(LENS)
    cache = model.new_kv_cache(num_slots=6, max_seq_len=32)
    assert native_cpu_attention(cache) == (cpu_path == "native")
    slots = torch.tensor([4, 0, 2, 5])  # arbitrary rows
    # prefill the first 1..3 tokens of each sequence (ragged), then decode the rest one token at a time,
    # with sequences dropping out as they finish (continuous batching).
    pre = [min(len(s), 1 + i) for i, s in enumerate(seqs)]
    got = [[] for _ in seqs]
    with torch.no_grad():
        h = model.forward_cached(torch.cat([s[:p] for s, p in zip(seqs, pre)]), torch.tensor([0] + pre).cumsum(0),
                                 cache, slots)
        for i, chunk in enumerate(model.logits(h).split(pre)):
            got[i].append(chunk)
        pos = list(pre)
        while True:
            live = [i for i, s in enumerate(seqs) if pos[i] < len(s)]
            if not live:
                break
            ids = torch.stack([seqs[i][pos[i]] for i in live])
            h = model.forward_cached(ids, torch.arange(len(live) + 1), cache, slots[live])
            for j, i in enumerate(live):
                got[i].append(model.logits(h[j : j + 1]))
                pos[i] += 1
    for i in range(len(seqs)):
        torch.testing.assert_close(torch.cat(got[i]), want[i], atol=2e-5, rtol=1e-5)
    assert cache.lengths[slots].tolist() == LENS
    assert cache.lengths[[1, 3]].tolist() == [0, 0]


def test_resume_appends_only_new_tokens():
    """A tool response appended mid-episode: prefill only the appended chunk, same as the full pass."""
    model, seqs = make("qwen2-gqa")
    s = torch.cat(seqs)  # one 32-token episode
    cache = model.new_kv_cache(num_slots=1, max_seq_len=40)
    with torch.no_grad():
        a = model.forward_cached(s[:11], torch.tensor([0, 11]), cache, torch.tensor([0]))
        b = model.forward_cached(s[11:], torch.tensor([0, len(s) - 11]), cache, torch.tensor([0]))
        full = model(s[None])[0]
    torch.testing.assert_close(model.logits(torch.cat([a, b])), full, atol=2e-5, rtol=1e-5)


def test_cache_overflow_and_bad_inputs_are_errors():
    model, seqs = make("qwen2-gqa")
    cache = model.new_kv_cache(num_slots=2, max_seq_len=8)
    with pytest.raises(ValueError, match="KV cache overflow"):
        model.forward_cached(seqs[2], torch.tensor([0, 17]), cache, torch.tensor([0]))
    with pytest.raises(ValueError, match="distinct"):
        model.forward_cached(seqs[0][:2], torch.tensor([0, 1, 2]), cache, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model.forward_packed(torch.cat(seqs), torch.tensor([0, 5, 6]))


def _vm_flags(addr: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `addr` (Linux /proc/self/smaps)."""
    found = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            found = lo <= addr < hi
        elif found and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_a_large_cpu_cache_asks_for_huge_pages():
    """A slab of several huge pages is madvise(MADV_HUGEPAGE)d before its first touch ("hg" among the
    mapping's VmFlags) and still reads as zeros; a small one is left alone. A hint only: the kernel
    may still back it with 4 KB pages, which changes no value."""
    import sys
    from pathlib import Path

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not sys.platform.startswith("linux") or not thp.is_file() or "[never]" in thp.read_text():
        pytest.skip("needs Linux with transparent huge pages")
    from sailor_engine.model.attention import KVCache

    cache = KVCache(2, 8, 2048, 2, 64)  # 8 MiB each for k and v
    for t in (cache.k, cache.v):
        assert "hg" in _vm_flags(t.data_ptr() + t.numel() * t.element_size() // 2)
        assert t.count_nonzero() == 0 and t.dtype == torch.float32
    assert cache.k.shape == (2, 8, 2, 64, 2048) and cache.v.shape == (2, 8, 2, 2048, 64)
    small = KVCache(1, 1, 64, 1, 16)
    assert "hg" not in _vm_flags(small.k.data_ptr())


def test_packed_positions_restart_per_sequence():
    cu = torch.tensor([0, 3, 3, 5])
    assert packed_positions(cu, 5).tolist() == [0, 1, 2, 0, 1]


def test_backend_resolution_on_cpu():
    status = backend_status()
    assert status["sdpa"] == "available"
    assert set(status) == {"flash_attn", "xformers", "flex", "native", "sdpa"}
    # auto on the CPU: the C kernel (tests/kernels/test_cpu_flash.py) for shapes it takes, else SDPA
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"  # no head_dim given
    if not torch.cuda.is_available():
        assert status["flash_attn"].startswith("unavailable")
        with pytest.raises(RuntimeError, match="'flash_attn' was forced but is unavailable"):
            resolve_backend("flash_attn", torch.device("cpu"), torch.bfloat16)
        with pytest.raises(RuntimeError, match="'xformers' was forced"):
            resolve_backend("xformers", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="attn_backend"):
        resolve_backend("magic", torch.device("cpu"), torch.float32)


def test_bf16_forward_tracks_fp32():
    model, seqs = make("qwen3-mha")
    with torch.no_grad():
        ref = model.forward_packed(torch.cat(seqs), cu_of(seqs))
        got = model.to(torch.bfloat16).forward_packed(torch.cat(seqs), cu_of(seqs))
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() / ref.abs().max() < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "xformers", "flex"])
def test_cuda_backends_match_sdpa(backend):
    """Each CUDA varlen backend against per-sequence SDPA on the same weights, bf16 (flash-attn has no fp32)."""
    if backend_status()[backend] != "available":
        pytest.skip(backend_status()[backend])
    outs = {}
    for b in (backend, "sdpa"):
        model, seqs = make("qwen2-gqa", attn_backend=b)  # same seed: same weights and tokens
        model = model.cuda().to(torch.bfloat16)
        with torch.no_grad():
            outs[b] = model.forward_packed(torch.cat(seqs).cuda(), cu_of(seqs).cuda()).float()
    torch.testing.assert_close(outs[backend], outs["sdpa"], atol=3e-2, rtol=3e-2)


def test_one_token_attention_of_a_row_does_not_depend_on_the_other_rows():
    """Bit for bit, on CPU: a decode row's attention is the same alone or among other rows, whatever
    their lengths (K, the longest, sets the scores' row length) and slots (views of the cache span,
    or copies when few rows are scattered over it). The generator's rows meet by tool timing, so
    anything else makes RL trajectories depend on it. Rows of odd length (not 64-byte aligned) once
    made MKL's bmm round a row differently (~4e-9 here)."""
    from sailor_engine.model.attention import KVCache, OneTokenAttention

    torch.manual_seed(0)
    cache = KVCache(1, 24, 2040, 2, 32)  # capacity not a multiple of 16 either
    cache.k.normal_()
    cache.v.normal_()
    q = torch.randn(24, 4, 32)
    alone = OneTokenAttention(cache, torch.tensor([23]), torch.tensor([1283]))(0, q[23:])[0]
    rng = torch.Generator().manual_seed(1)
    for trial in range(60):
        others = torch.randperm(23, generator=rng)[: 1 + trial % 20]
        slots = torch.cat([others, torch.tensor([23])])[torch.randperm(len(others) + 1, generator=rng)]
        start = torch.randint(1, 2039, (len(slots),), generator=rng)
        start[slots == 23] = 1283
        out = OneTokenAttention(cache, slots, start)(0, q[slots])
        assert torch.equal(out[slots == 23][0], alone), (trial, slots.tolist(), start.tolist())


@pytest.mark.parametrize("budget", [None, 4096], ids=["blocks", "small-blocks"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa2", "gqa4"])
def test_cached_tokens_do_not_depend_on_how_they_were_chunked(kv_heads, budget, monkeypatch, two_threads,
                                                            cpu_path):
    """Bit for bit, on CPU, on two threads: a sequence's hidden states and K, V are the same prefilled
    in one call, decoded token by token, or appended in any chunks (crossing the 256-query blocks),
    alone or next to another slot's chunk. The generator re-prefills a parked session's whole history
    when its cache row was taken: anything else makes an RL trajectory follow tool timing. SDPA's
    flash kernel and baddbmm past ~512 rows both rounded unlike the one-token path. The generator's
    path (FusedWeights); the module path runs one-row GEMMs as GEMVs. small-blocks: a scores budget
    that cuts long rows into blocks of 1-3 queries (query rows are padded to a multiple of four)."""
    from sailor_engine.model import attention
    from sailor_engine.model.transformer import FusedWeights

    if budget:
        if cpu_path == "native":
            pytest.skip("the scores budget is the torch path's")
        monkeypatch.setattr(attention, "_SCORES_PER_BLOCK", budget)

    cfg = ModelConfig(family="qwen2", qkv_bias=True, vocab_size=97, hidden_size=64, intermediate_size=176,
                      num_layers=2, num_heads=4, num_kv_heads=kv_heads, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = Transformer(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(1)).eval()
    L = 600
    ids = torch.randint(0, 97, (L,))
    weights = FusedWeights(model)

    def run(chunks, other=0):
        cache, pos, hidden = model.new_kv_cache(2, 640), 0, []
        with torch.inference_mode():
            for n in chunks:
                extra = torch.randint(0, 97, (other,))
                cache.lengths[1] = 0
                h = model.forward_cached(torch.cat([ids[pos : pos + n], extra]), torch.tensor([0, n, n + other]),
                                         cache, torch.tensor([0, 1]), weights=weights)
                hidden.append(h[:n])
                pos += n
        return torch.cat(hidden), cache.k[:, 0, :, :, :L], cache.v[:, 0, :, :L]

    whole = run([L])
    for chunks in ([1] * L, [300, 1, 1, 298], [5, 520, 75], [L - 1, 1]):
        for other in (0, 3):
            got = run(chunks, other)
            assert all(torch.equal(a, b) for a, b in zip(whole, got)), (chunks[:4], other)


def test_cached_forward_under_cpu_autocast(cpu_path):
    """bf16 autocast over an fp32 cache (activations bf16, cache fp32): both CPU paths run and track
    the fp32 forward to bf16 accuracy (the C kernel attends in fp32 and casts back)."""
    model, seqs = make("qwen3-mha")
    s = torch.cat(seqs)[:20]
    cache = model.new_kv_cache(num_slots=2, max_seq_len=32, dtype=torch.float32)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model.forward_cached(s, torch.tensor([0, len(s)]), cache, torch.tensor([1]))
        want = model(s[None])[0]
        got = model.logits(h.float())
    assert cache.lengths[1] == len(s)
    torch.testing.assert_close(got, want, atol=0.15, rtol=0.05)


class _NoHostReads(torch.overrides.TorchFunctionMode):
    """Fails any op that reads tensor values on the host (a synchronisation on CUDA, so not
    capturable in a CUDA graph) or whose output shape depends on tensor values."""

    SYNCING = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
               torch.Tensor.unique, torch.unique, torch.masked_select, torch.Tensor.masked_select}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            raise AssertionError(f"{func.__name__} reads device memory on the host")
        if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and "output_size" not in (kwargs or {}):
            raise AssertionError("repeat_interleave without output_size reads device memory on the host")
        if func is torch.Tensor.__getitem__ and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                   for i in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            raise AssertionError("boolean-mask indexing has a data-dependent shape")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("name", CFGS)
def test_forward_decode_matches_forward_cached(name, impl):
    """The static decode step (the generator's CUDA graph body): after a prefill, decoding tokens one
    per row, rows in shuffled slots, padded with rows on a scratch slot, gives forward_cached's hidden
    states to rounding, the same cache contents and lengths, and reads nothing on the host."""
    model, seqs = make(name)
    slots = torch.tensor([3, 0, 5, 1])
    scratch = 6
    caches = [model.new_kv_cache(num_slots=7, max_seq_len=40) for _ in range(2)]
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for cache in caches:
            model.forward_cached(torch.cat(seqs), cu_of(seqs), cache, slots)
        for step in range(5):
            ids = torch.randint(0, model.cfg.vocab_size, (4,), generator=g)
            want = model.forward_cached(ids, torch.arange(5), caches[0], slots)
            pad_ids, pad_slots = torch.cat([ids, ids[:2]]), torch.cat([slots, torch.tensor([scratch] * 2)])
            with _NoHostReads():
                got = model.forward_decode(pad_ids, caches[1], pad_slots, attn_impl=impl)
                caches[1].lengths[scratch : scratch + 1].zero_()
            torch.testing.assert_close(got[:4], want, atol=2e-5, rtol=1e-5)
    a, b = caches
    assert a.lengths[:6].tolist() == b.lengths[:6].tolist()
    for s, n in zip(slots.tolist(), a.lengths[slots].tolist()):
        torch.testing.assert_close(b.k[:, s, ..., :n], a.k[:, s, ..., :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.v[:, s, :, :n], a.v[:, s, :, :n], atol=1e-5, rtol=1e-5)


def test_the_host_read_guard_catches_a_sync():
    with pytest.raises(AssertionError, match="reads device memory"), _NoHostReads():
        int(torch.tensor([3]).max())
    with pytest.raises(AssertionError, match="data-dependent"), _NoHostReads():
        torch.arange(3)[torch.tensor([True, False, True])]
