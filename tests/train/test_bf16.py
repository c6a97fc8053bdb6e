"""train.dtype: bf16 autocast with fp32 master weights, tested on CPU (torch's autocast has a CPU bf16 path).

What must hold, and what each test checks it against:
- train.dtype resolves per device (auto: bf16 on CUDA, fp32 on CPU) and bfloat16 is no longer refused;
  under autocast the attention backend is chosen for bf16 and flash-attn / xformers get one dtype. The
  fused log-prob kernel ignores autocast, hence Runtime.head_inputs.
- One RFT step under bf16: parameters, gradients and AdamW state stay fp32; the loss sits near a float64
  full-logits reference, but measurably farther than the fp32 step's (so autocast was on).
- The RFT trainer end to end on the tiny world (test_rft's): train.dtype=auto on CPU writes the
  float32 run's metrics bit for bit; bfloat16 tracks them within u (below) over the first steps and differs
  from them; its checkpoint (model + Adam moments) is all fp32. Under torchrun, pp=2 (where 1F1B
  calls the stages itself) reproduces the single-process bf16 run, not the fp32 one; tp=2 tracks it.
- One RL update (run_update) on episodes the Generator sampled with the fp32 module: under bf16 the
  sampling / training log-prob mismatch of the first update is bf16 noise, not fp32's ~1e-6, and the
  loss and gradients still track the fp32 update.

Tolerances. bf16 keeps 8 significant bits (unit roundoff u = 2^-9 ~ 2e-3). A loss is a mean of fp32
log-softmaxes over thousands of tokens whose logits carry a few u of relative noise; the noise
averages out, so the loss stays within u of fp32's until the diverging weights take over (the tiny
world, 9 steps: <= 2.1e-4 over steps 1-4, then 2% at step 5's loss spike, grad norm ~11; tested: the
first 3). Gradients are averaged less: 5e-2 relative (measured 4e-3). Per-token log-probs are not
averaged at all: the RL mismatch bound is 16 u (measured 2e-3 at this init; on test_rl's memorised
RFT model, whose logits are large, 0.22 on the first update: bf16 noise scales with the logits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors import safe_open

from sailor_engine.config import Config
from sailor_engine.model import Transformer
from sailor_engine.parallel.dims import ParallelDims
from sailor_engine.rollout.generator import Generator, SamplingParams
from sailor_engine.synth.pipeline import synthesize, write_world
from sailor_engine.train.__main__ import main
from sailor_engine.train.batching import Sequence
from sailor_engine.train.rft import run_step
from sailor_engine.train.rl import run_update
from sailor_engine.train.setup import Runtime, _check_wired, build_optimizer, compute_dtype, wrap_model
from tests.train.tiny import MODEL_YAML, SYNTH

CONFIG = MODEL_YAML + """\
train:
  data_dir: DATA
  micro_batch_tokens: 2048
  rft: {batch_size: 6, epochs: 3, lr: 1.0e-2, warmup_steps: 2, min_lr_ratio: 0.1}
"""
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
MODEL = dict(family="qwen2", qkv_bias=True, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
             num_kv_heads=2, max_position_embeddings=2048, vocab_size=384)
U = 2.0 ** -9  # bf16 unit roundoff


def config(**sections) -> Config:
    return msgspec.convert({"model": MODEL, **sections}, Config)


def fresh_model(cfg: Config, std: float = 0.02) -> Transformer:
    return Transformer(cfg.model).init_weights(std=std, generator=torch.Generator().manual_seed(1))


def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over every tensor of the two dicts."""
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b)
    return (num / sum(float(b[k].double().pow(2).sum()) for k in b)) ** 0.5


# -- train.dtype -----------------------------------------------------------------------------------


def test_train_dtype_resolves_per_device_and_bf16_is_wired():
    for dtype, device, want in [("auto", CPU, None), ("auto", CUDA, torch.bfloat16), ("float32", CUDA, None),
                                ("bfloat16", CPU, torch.bfloat16), ("bfloat16", CUDA, torch.bfloat16)]:
        assert compute_dtype(config(train={"dtype": dtype}), device) == want, (dtype, device)
    dims = ParallelDims.resolve(config().parallel, 1)
    _check_wired(config(train={"dtype": "bfloat16"}), dims)  # refused ("not wired into the trainer yet") before


def test_attention_backend_and_dtypes_follow_autocast(monkeypatch):
    """Under autocast the model resolves its backend for the autocast dtype (so flash-attn, fp16/bf16
    only, is chosen on CUDA for fp32 master weights), and flash-attn / xformers get q, k, v in it."""
    from sailor_engine.model import attention

    seen = []
    monkeypatch.setattr("sailor_engine.model.transformer.model_backend",
                        lambda cfg, dev, dt: seen.append(dt) or "sdpa")
    m = Transformer(config().model)
    m._backend(CPU)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m._backend(CPU)
    assert seen == [torch.float32, torch.bfloat16]
    q, k, v = torch.randn(3, 4, 2, 8).unbind(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {t.dtype for t in attention._one_dtype(q, k, v.bfloat16())} == {torch.bfloat16}
    assert {t.dtype for t in attention._one_dtype(q, k, v)} == {torch.float32}


def test_runtime_contexts():
    fp32, bf16 = Runtime(None, 0, CPU), Runtime(None, 0, CPU, torch.bfloat16)
    h, w = torch.randn(3, 8), torch.randn(5, 8)
    assert fp32.head_inputs(h, w) == (h, w)
    assert [t.dtype for t in bf16.head_inputs(h, w)] == [torch.bfloat16] * 2
    with fp32.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu") and (h @ w.T).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    lin = torch.nn.Linear(8, 2)
    assert fp32.autocast_calls(lin) is lin
    wrapped = bf16.autocast_calls(lin)
    assert wrapped(h).dtype == torch.bfloat16 and wrapped.weight is lin.weight and lin(h).dtype == torch.float32


def test_fused_logprob_is_invisible_to_autocast():
    """head_inputs casts for the kernel because autocast does not: fp32 inputs under autocast give
    outside-autocast results bit for bit, and bf16 inputs give fp32 log-probs of the rounded inputs."""
    from sailor_engine.kernels.logprob import fused_linear_logprob

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(37, 24, generator=g), torch.randn(200, 24, generator=g)
    t = torch.randint(0, 200, (37,), generator=g)
    outside = fused_linear_logprob(h, w, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fused_linear_logprob(h, w, t)
        low = fused_linear_logprob(h.bfloat16(), w.bfloat16(), t)
    assert torch.equal(inside, outside) and low.dtype == torch.float32
    z = h.bfloat16().double() @ w.bfloat16().double().T  # the rounded inputs' logits, float64
    ref = torch.log_softmax(z, -1).gather(-1, t[:, None])[:, 0]
    # fp32 arithmetic on the rounded inputs (measured 1e-6, |logp| up to 24), far below the rounding's own 4e-2
    assert (low.double() - ref).abs().max() < 1e-4 < (outside.double() - ref).abs().max()


# -- RFT ---------------------------------------------------------------------------------------------


def rft_sequences() -> list[list[Sequence]]:
    g = torch.Generator().manual_seed(0)
    seqs = []
    for n in (40, 65, 23, 90):
        ids = torch.randint(0, 384, (n,), generator=g).tolist()
        seqs.append(Sequence(ids, (torch.rand(n, generator=g) < 0.6).long().tolist()))
    return [seqs[:2], seqs[2:]]  # two micro-batches


@torch.no_grad()
def reference_loss(cfg: Config, mbs: list[list[Sequence]]) -> float:
    """The step's loss in float64 with full logits: -mean log_softmax(target) over the policy tokens."""
    model = fresh_model(cfg).double()
    total, count = 0.0, 0
    for s in (s for mb in mbs for s in mb):
        logp = torch.log_softmax(model(torch.tensor([s.token_ids[:-1]]))[0], -1)
        logp = logp.gather(-1, torch.tensor(s.token_ids[1:])[:, None])[:, 0]
        mask = torch.tensor(s.loss_mask[1:], dtype=torch.float64)
        total, count = total - float((logp * mask).sum()), count + int(mask.sum())
    return total / count


def rft_step(cfg: Config, rt: Runtime, mbs) -> tuple[float, Transformer, torch.optim.AdamW, dict]:
    model = fresh_model(cfg)
    stage = wrap_model(model, cfg, rt)
    opt = build_optimizer(stage.parameters(), cfg)
    loss, _ = run_step(stage, None, mbs, rt)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return loss, model, opt, grads


def test_rft_step_under_bf16_keeps_fp32_master_weights():
    cfg, mbs = config(), rft_sequences()
    ref = reference_loss(cfg, mbs)
    loss32, _, _, grads32 = rft_step(cfg, Runtime(None, 0, CPU), mbs)
    loss16, model, opt, grads16 = rft_step(cfg, Runtime(None, 0, CPU, torch.bfloat16), mbs)
    err32, err16 = abs(loss32 - ref) / ref, abs(loss16 - ref) / ref
    print(f"loss vs float64: fp32 {err32:.1e}, bf16 {err16:.1e}; grads bf16 vs fp32 {rel(grads16, grads32):.1e}")
    assert err32 < 1e-6 and 30 * err32 < err16 < U  # autocast ran, and stayed within a rounding unit
    assert rel(grads16, grads32) < 5e-2
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    moments = [v for st in opt.state.values() for k, v in st.items() if k != "step"]
    assert len(moments) == 2 * len(list(model.parameters())) and all(m.dtype == torch.float32 for m in moments)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bf16")
    write_world(synthesize(SYNTH), root / "data")
    (root / "run.yaml").write_text(CONFIG.replace("DATA", str(root / "data")))
    return root


RUN = ("train.rft.max_steps=3", "train.checkpoint_every=0", "train.plots=false")


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(world) -> dict[str, Path]:
    """The tiny world's first 3 RFT steps under each train.dtype, single process."""
    outs = {}
    for dtype in ("float32", "auto", "bfloat16"):
        outs[dtype] = world / dtype
        args = ["--config", str(world / "run.yaml"), "--set", f"train.out_dir={outs[dtype]}",
                "--set", f"train.dtype={dtype}"]
        assert main([*args, *(a for o in RUN for a in ("--set", o))]) == 0
    return outs


def test_rft_run_bf16_tracks_fp32_and_auto_is_fp32_on_cpu(runs):
    fp32, auto, bf16 = (metrics(runs[d]) for d in ("float32", "auto", "bfloat16"))
    out = runs["bfloat16"]
    keys = ("step", "loss", "grad_norm", "lr", "tokens", "loss_tokens")
    assert [[r[k] for k in keys] for r in auto] == [[r[k] for k in keys] for r in fp32]  # bit for bit
    diffs = [abs(b["loss"] - a["loss"]) / a["loss"] for a, b in zip(fp32, bf16, strict=True)]
    print("bf16 vs fp32 relative loss difference per step:", " ".join(f"{d:.1e}" for d in diffs))
    assert 1e-5 < max(diffs) < U
    (ckpt,) = (out / "checkpoints").glob("step-*/*.safetensors")
    with safe_open(ckpt, "pt") as f:
        names = list(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names} == {"F32"}
    params = [n for n in names if not n.startswith("optim.")]
    assert {f"optim.{n}.{m}" for n in params for m in ("exp_avg", "exp_avg_sq")} <= set(names)


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["parallel.pp=2", "parallel.tp=2"], ids=["pp2", "tp2"])
def test_several_processes_track_the_single_process_bf16_run(world, runs, layout):
    """pp=2: 1F1B calls the stages itself (autocast_calls). tp=2: bf16 partial sums cross gloo, and the
    fused log-prob gets a bf16 vocab shard."""
    out = world / f"{layout}-bf16"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m",
           "sailor_engine.train", "--config", str(world / "run.yaml"), "--set", f"train.out_dir={out}"]
    for o in (*RUN, layout, "train.dtype=bfloat16"):
        cmd += ["--set", o]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got, bf16, fp32 = metrics(out), metrics(runs["bfloat16"]), metrics(runs["float32"])
    d = lambda a, b: abs(a["loss"] - b["loss"]) / b["loss"]  # noqa: E731
    print(f"{layout} vs bf16:", " ".join(f"{d(a, b):.1e}" for a, b in zip(got, bf16)),
          "| bf16 vs fp32:", " ".join(f"{d(a, b):.1e}" for a, b in zip(bf16, fp32)))
    assert max(d(a, b) for a, b in zip(got, bf16, strict=True)) < U
    if layout == "parallel.pp=2":
        # Step 1, same weights: the stages' other packing moves fp32 sums only (measured 2e-8), while bf16
        # rounding moves the loss ~1e-6 (at init the logits, so their rounding errors, are small). (tp's
        # bf16 all-reduce of partial sums is a rounding of its own: measured 8e-8, no such margin.)
        assert d(got[0], bf16[0]) < 0.1 * d(bf16[0], fp32[0])


# -- RL ------------------------------------------------------------------------------------------------


def sampled_mini(cfg: Config) -> list[tuple[Sequence, float]]:
    """Four episodes the Generator samples from the fp32 model at the rollout temperature, with advantages."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 384, (n,), generator=g).tolist() for n in (12, 30, 7, 20)]
    params = SamplingParams(temperature=cfg.rollout.temperature, max_new_tokens=24, seed=3)
    outs = Generator(fresh_model(cfg), max_batch=4, max_seq_len=256).generate(prompts, params)
    mini = []
    for p, o, adv in zip(prompts, outs, (1.0, -0.5, 0.3, -1.2)):
        n = len(o.token_ids)
        mini.append((Sequence(p + list(o.token_ids), [0] * len(p) + [1] * n, [0.0] * len(p) + list(o.logprobs)), adv))
    return mini


def test_rl_update_under_bf16_on_fp32_samples():
    cfg = config(rollout={"temperature": 0.7})
    mini = sampled_mini(cfg)
    out = {}
    for dtype in (None, torch.bfloat16):
        model = fresh_model(cfg)
        rt = Runtime(None, 0, CPU, dtype)
        st = run_update(wrap_model(model, cfg, rt), model, mini, cfg, rt)
        out[dtype] = st, {n: p.grad for n, p in model.named_parameters()}
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    (st32, g32), (st16, g16) = out[None], out[torch.bfloat16]
    print(f"logp_mismatch_max: fp32 {st32['logp_mismatch_max']:.1e}, bf16 {st16['logp_mismatch_max']:.1e}; "
          f"loss {st32['loss']:.6f} vs {st16['loss']:.6f}; grads {rel(g16, g32):.1e}")
    assert st32["logp_mismatch_max"] < 1e-5  # the Generator's numerics are the trainer's in fp32
    assert 1e-4 < st16["logp_mismatch_max"] < 16 * U  # bf16 noise: expected, logged, not a bug
    assert abs(st16["loss"] - st32["loss"]) < 4 * U * abs(st32["loss"]) and rel(g16, g32) < 5e-2
