"""The RFT cold-start loop: supervised training on expert trajectories, loss on policy tokens only.

    rt = init_runtime(cfg)
    history = train_rft(cfg, rt)        # list of the per-step metrics (also in out_dir/metrics.jsonl)

One optimizer step:
1. The global batch: `cfg.train.rft.batch_size` trajectories, the step's slice of a permutation of
   the data seeded by (train.seed, epoch) — a pure function of the step, identical on every rank,
   so resuming needs only the step (`batch_indices`).
2. Dealt to the dp ranks balanced by token count (`deal`), then packed first-fit-decreasing into
   micro-batches of at most train.micro_batch_tokens (`micro_batches`; at least
   parallel.pp_microbatches under pipeline parallelism where the sequences allow). Every dp rank
   runs the same number of micro-batches (FSDP2 needs it; DDP is spared uneven waits): a rank with
   fewer gets 2-token padding micro-batches whose loss mask is zero (an exactly-zero share).
3. Loss: token-mean over all policy tokens of the step on all dp ranks (`global_norm`, all-reduced
   before any backward), fused log-prob on the output weight (tp_group: the vocab shard), gradients
   summed over dp (data.py); with pp > 1 the micro-batches run through the stages by 1F1B and the
   loss is taken on the last stage. So any dp / tp / pp / micro-batch layout computes the
   single-process step.
4. Grad norm over every shard and stage (`global_grad_norm`), clip, AdamW at the step's lr. A step
   whose loss or grad norm is not finite is skipped and logged; train.max_nonfinite_steps of them
   in a row stop the run (train/guards.py).
Rank 0 writes metrics.jsonl and a progress line every train.log_every steps. Checkpoints every
train.checkpoint_every steps (and at the end) hold model, optimizer and {step, data position};
keep_last are kept; with train.resume the newest complete one is loaded and metrics.jsonl cut back
to it, so a resumed run writes the lines an uninterrupted one would. The end exports out_dir/hf.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from sailor_engine.config import Config, ConfigError
from sailor_engine.kernels.logprob import fused_linear_logprob
from sailor_engine.model.parallelize import shard_plan
from sailor_engine.parallel.checkpoint import MANIFEST, export_hf, read_manifest, remove_checkpoint
from sailor_engine.parallel.data import check_micro_batches, grad_sync, rft_loss, set_grad_sync, unwrap
from sailor_engine.parallel.pipeline import MicroBatch, PipelineStage, one_f_one_b
from sailor_engine.rl.loss import global_norm
from sailor_engine.train.batching import Sequence, ffd_split, pack
from sailor_engine.train.guards import NonFiniteGuard, json_row
from sailor_engine.train.plots import (HAS_TENSORBOARD, PlotsUnavailable, TensorBoardSink, TensorBoardUnavailable,
                                       write_plots)
from sailor_engine.train.schedule import lr_at
from sailor_engine.train.setup import Runtime, build_model, build_optimizer, load_rft_data, wrap_model
from sailor_engine.train.state import is_fsdp, load_state, save_state

# -- data order --------------------------------------------------------------------------------


def total_steps(num_seqs: int, cfg: Config) -> int:
    """Optimizer steps of the run: full batches per epoch x epochs, capped by rft.max_steps."""
    r = cfg.train.rft
    per_epoch = num_seqs // r.batch_size
    if per_epoch == 0:
        raise ConfigError(f"train.rft.batch_size ({r.batch_size}) is larger than the {num_seqs} expert "
                          "trajectories of train.data_dir")
    return min(per_epoch * r.epochs, r.max_steps or per_epoch * r.epochs)


def batch_indices(step: int, num_seqs: int, batch_size: int, seed: int) -> list[int]:
    """The trajectories of optimizer step `step`: its slice of epoch (step // steps per epoch)'s
    permutation, seeded by (seed, epoch). An epoch's last num_seqs % batch_size are left out of it."""
    per_epoch = num_seqs // batch_size
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_seqs, generator=g)[k * batch_size:(k + 1) * batch_size].tolist()


def deal(seqs: list[Sequence], dp: int) -> list[list[Sequence]]:
    """Longest first, each to the dp rank with the fewest tokens so far (lowest rank on ties); every rank
    keeps its sequences in batch order. Deterministic, so each rank computes every rank's share."""
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i].token_ids), i))
    load, owner = [0] * dp, [0] * len(seqs)
    for i in order:
        r = min(range(dp), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += len(seqs[i].token_ids) - 1
    return [[s for s, o in zip(seqs, owner) if o == r] for r in range(dp)]


def micro_batches(shares: list[list[Sequence]], budget: int, rank: int, at_least: int = 1) -> list[list[Sequence]]:
    """This rank's micro-batches (lists of sequences, <= budget positions each): every rank's share is
    packed first-fit-decreasing by tokens, then (pipeline stages want >= parallel.pp_microbatches in
    flight) the largest micro-batch of several sequences is halved until `at_least` are reached or none can be;
    all ranks are padded to the same count with zero-loss 2-token micro-batches."""
    splits = [ffd_split(s, budget) if s else [] for s in shares]
    for mbs in splits:
        while len(mbs) < at_least and any(len(mb) > 1 for mb in mbs):
            i = max((i for i, mb in enumerate(mbs) if len(mb) > 1), key=lambda i: _positions(mbs[i]))
            half = len(mbs[i]) // 2
            mbs[i:i + 1] = [mbs[i][:half], mbs[i][half:]]
    count = max(at_least, *(len(s) for s in splits))
    mine = splits[rank]
    donor = next(s for share in shares for s in share)  # any real sequence: two tokens of it, no loss
    pad = Sequence(donor.token_ids[:2], [0, 0])
    return mine + [[pad]] * (count - len(mine))


def _positions(mb: list[Sequence]) -> int:
    return sum(len(s.token_ids) - 1 for s in mb)


# -- one step ----------------------------------------------------------------------------------


def run_step(stage: nn.Module, tp_group, mbs: list[list[Sequence]], rt: Runtime) -> tuple[float, int]:
    """Forward + backward of this rank's micro-batches; returns (the step's loss, its policy tokens), global."""
    packed = [pack(mb).to(rt.device) for mb in mbs]
    if rt.dp_group is not None:
        check_micro_batches(len(packed), rt.dp_group)
    norm = global_norm([p.loss_mask for p in packed], [p.seq_ids for p in packed], dp_group=rt.dp_group)
    if norm.num_tokens == 0:
        raise ValueError("this step's trajectories hold no policy tokens (every loss mask is zero)")
    net = unwrap(stage)

    def loss_fn(hidden: torch.Tensor, i: int) -> torch.Tensor:  # micro-batch i's share of the step's loss
        # fp32 loss math on fp32 log-probs; the head's matmul in rt's compute dtype (setup.Runtime)
        logp = fused_linear_logprob(*rt.head_inputs(hidden, net.output_weight), packed[i].loss_targets,
                                    tp_group=tp_group)  # loss rows only
        return rft_loss(logp, packed[i].loss_mask, norm)

    mbs = [MicroBatch.packed(p.input_ids, p.cu_seqlens) for p in packed]
    loss = torch.zeros((), dtype=torch.float64, device=rt.device)
    if rt.pp > 1:
        last = net.is_last
        sync = (lambda i, is_last: set_grad_sync(stage, is_last)) if rt.dp > 1 else None  # noqa: E731
        # only the stage's forwards under autocast: one_f_one_b runs the backwards itself
        out = one_f_one_b(rt.autocast_calls(stage), mbs if net.is_first else None, loss_fn if last else None,
                          rt.groups.pp, before_backward=sync)
        if last:
            loss += out
        dist.all_reduce(loss, group=rt.groups.pp)  # from the last stage to every stage
    else:
        for i, mb in enumerate(mbs):
            with grad_sync(stage, i == len(mbs) - 1):  # dp reduction once, after the last backward
                with rt.autocast():  # the forward only: a backward under autocast would downcast too
                    hidden = stage(mb.input_ids, mb.cu_seqlens, mb.positions)
                part = loss_fn(hidden, i)
                part.backward()
            loss += part.detach()
    if rt.dp_group is not None:
        dist.all_reduce(loss, group=rt.dp_group)
    return float(loss), norm.num_tokens


def global_grad_norm(net: PipelineStage, rt: Runtime) -> torch.Tensor:
    """L2 norm of the full gradient, whatever the layout: replicated parameters count once, tp shards
    are summed over the tp group (a block held by r replicas, GQA kv heads, weighs 1 / r), stages over
    the pp group (the last stage's copy of a tied embedding left out: it holds the first's gradient).
    Under DDP every dp rank holds the reduced gradient already; under FSDP2 each holds its rows of
    it, summed over dp. Returns an fp32 scalar."""
    plan = shard_plan(net)
    sq = torch.zeros(2, dtype=torch.float32, device=rt.device)  # [replicated over tp, sharded over tp]
    for name, p in net.named_parameters():
        if p.grad is None or (net.tied_copy and name == "lm_head.weight"):
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        s = g.detach().float().pow(2).sum()
        shard = plan.get(name)
        if shard is None:
            sq[0] += s
        else:
            sq[1] += s * shard.size / (rt.tp * (shard.stop - shard.start))  # / replicas of this block
    if rt.dp_group is not None and is_fsdp(net):
        dist.all_reduce(sq, group=rt.dp_group)
    if rt.pp > 1:
        dist.all_reduce(sq, group=rt.groups.pp)
    if rt.tp > 1:
        dist.all_reduce(sq[1:], group=rt.groups.tp)
    return sq.sum().sqrt()


def clip_(net: nn.Module, norm: torch.Tensor, max_norm: float) -> None:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)), as torch's clip_grad_norm_."""
    if max_norm <= 0:
        return
    coef = min(1.0, max_norm / (float(norm) + 1e-6))  # a Python float: grads may be DTensors
    for p in net.parameters():
        if p.grad is not None:
            p.grad.mul_(coef)


# -- checkpoints -------------------------------------------------------------------------------


def _ckpt_root(cfg: Config) -> Path:
    return Path(cfg.train.out_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories with a manifest (complete), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MANIFEST).is_file())


def save_step(model, net, opt, cfg: Config, rt: Runtime, step: int, run_key: dict) -> Path:
    """Checkpoint `step` (manifest extra: the run key and the step), then drop all but the newest
    train.keep_last complete ones. Collective; returns the checkpoint's path."""
    path = _ckpt_root(cfg) / f"step-{step:08d}"
    save_state(model, net, opt, path, rt, {**run_key, "step": step})
    if rt.rank == 0:
        for old in complete_checkpoints(_ckpt_root(cfg))[:-cfg.train.keep_last]:
            remove_checkpoint(old)
    _barrier(rt)
    return path


def finish(save, last: int, saved: int | None, cfg: Config, rt: Runtime, log: _Log) -> None:
    """The end of a phase: checkpoint `last` unless it was just saved (save(step)), export it to
    out_dir/hf, flush TensorBoard and write the plots."""
    if saved != last:
        save(last)
    if rt.rank == 0:
        export_hf(_ckpt_root(cfg) / f"step-{last:08d}", Path(cfg.train.out_dir) / "hf")
    log.close()
    _barrier(rt)


def resume_latest(model, net, opt, cfg: Config, rt: Runtime, want: dict, mismatch: str, advice: str) -> int:
    """Load the newest complete checkpoint of out_dir (rank 0 picks it for everyone); the step to continue from.

    want: manifest "extra" entries the checkpoint must carry (else a ConfigError: "<path> <mismatch>
    (k: then, now; ...); use <advice> or train.resume=false").
    """
    found = [str(p) for p in complete_checkpoints(_ckpt_root(cfg))[-1:]] or [None]
    if rt.groups is not None:
        dist.broadcast_object_list(found, src=0)
    if found[0] is None:
        return 0
    extra = read_manifest(found[0])["extra"]
    diff = {k: (extra.get(k), v) for k, v in want.items() if extra.get(k) != v}
    if diff:
        raise ConfigError(f"train.resume: {found[0]} {mismatch} "
                          f"({', '.join(f'{k}: {a} then, {b} now' for k, (a, b) in diff.items())}); "
                          f"use {advice} or train.resume=false")
    load_state(model, net, opt, found[0], rt)
    return int(extra["step"])


def fresh_start(cfg: Config) -> int:
    """train.resume=false: step 0, in an out_dir without checkpoints (keep_last would delete the new
    run's checkpoints in favour of the old run's later steps, and a later resume continue the old run)."""
    found = complete_checkpoints(_ckpt_root(cfg))
    if found:
        raise ConfigError(f"train.resume = false, but train.out_dir = {cfg.train.out_dir!r} holds checkpoints "
                          f"({found[-1].name}); use another train.out_dir, remove them, or train.resume=true")
    return 0


def _barrier(rt: Runtime) -> None:
    if rt.groups is not None:
        dist.barrier()


# -- the loop ----------------------------------------------------------------------------------


class _Log:
    """Rank 0's metrics.jsonl (cut back to `start` steps on resume), progress lines, TensorBoard
    scalars (train.tensorboard) and, at the end, PNG plots of every curve (train.plots)."""

    def __init__(self, path: Path, start: int, enabled: bool, cfg: Config | None = None):
        self.path, self.enabled = path, enabled
        self.tb, self.plots = None, cfg is not None and cfg.train.plots
        if cfg is not None and cfg.train.tensorboard and (enabled or not HAS_TENSORBOARD):
            try:  # missing, it fails on every rank: all exit 2 together
                self.tb = TensorBoardSink(path.parent / "tb")
            except TensorBoardUnavailable as e:
                raise ConfigError(str(e)) from None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if start > 0 and path.exists():
                lines = [ln for ln in path.read_text().splitlines() if ln]
                kept = [ln for i, ln in enumerate(lines) if _logged_step(path, ln, i + 1 == len(lines)) <= start]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, path)  # killed here, the old lines or the kept ones remain, never none

    def record(self, row: dict) -> None:
        """Append the row to metrics.jsonl (and TensorBoard)."""
        with open(self.path, "a") as f:
            f.write(json_row(row) + "\n")
        if self.tb is not None:
            self.tb.add(row)

    def close(self) -> None:
        """At the end of the run: TensorBoard flushed, plots written (a missing matplotlib is a warning)."""
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        if self.plots:
            try:
                write_plots(self.path, self.path.parent / "plots")
            except PlotsUnavailable as e:
                print(f"warning: no plots: {e}", flush=True)

    def write(self, row: dict, total: int) -> None:
        if not self.enabled:
            return
        self.record(row)
        self.progress(row, total)

    def progress(self, row: dict, total: int) -> None:
        if row.get("skipped"):
            print(f"step {row['step']}/{total}  skipped: {row['skipped']} (loss {row['loss']}, grad_norm "
                  f"{row['grad_norm']})", flush=True)
            return
        print(f"step {row['step']}/{total}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  grad_norm "
              f"{row['grad_norm']:.3f}  {row['tokens_per_s']:.0f} tok/s  {row['time']:.1f}s", flush=True)


def _logged_step(path: Path, line: str, last: bool) -> float:
    """The step of a metrics line. Only the last line can have been cut short by a crash: it is
    dropped (inf: after any checkpoint, its step is trained again)."""
    try:
        return json.loads(line)["step"]
    except ValueError:
        if last:
            return float("inf")
        raise ValueError(f"{path}: a line that is not JSON before the last one: {line[:80]!r}") from None


def train_rft(cfg: Config, rt: Runtime) -> list[dict]:
    """Run (or resume) the RFT phase; returns this run's per-step metrics (on every rank)."""
    t = cfg.train
    data = load_rft_data(t.data_dir, cfg)
    n = len(data.seqs)
    total = total_steps(n, cfg)
    model = build_model(cfg, data.vocab_size, rt)
    stage = wrap_model(model, cfg, rt)  # before the optimizer: FSDP2 replaces the parameters
    net = unwrap(stage)  # this rank's PipelineStage: what the optimizer, grad norm and checkpoints see
    opt = build_optimizer(net.parameters(), cfg)
    want = {"num_seqs": n, "batch_size": cfg.train.rft.batch_size, "seed": cfg.train.seed}
    start = resume_latest(model, net, opt, cfg, rt, want, "was saved with another data order",
                          "another train.out_dir") if t.resume else fresh_start(cfg)
    log = _Log(Path(t.out_dir) / "metrics.jsonl", start, rt.rank == 0, cfg)
    history, saved, t0 = [], start if start > 0 else None, time.perf_counter()
    save = lambda step: save_step(model, net, opt, cfg, rt, step, want)  # noqa: E731
    guard = NonFiniteGuard(t.max_nonfinite_steps, _ckpt_root(cfg) / f"step-{start:08d}" if start > 0 else None)
    for step in range(start, total):
        tic = time.perf_counter()
        lr = lr_at(step, peak=t.rft.lr, warmup_steps=t.rft.warmup_steps, total_steps=total,
                   min_lr_ratio=t.rft.min_lr_ratio, schedule=t.rft.schedule)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = [data.seqs[i] for i in batch_indices(step, n, t.rft.batch_size, t.seed)]
        mbs = micro_batches(deal(batch, rt.dp), t.micro_batch_tokens, rt.dp_rank,
                            cfg.parallel.pp_microbatches if rt.pp > 1 else 1)
        loss, loss_tokens = run_step(stage, model.tp_group, mbs, rt)
        positions = sum(len(s.token_ids) - 1 for s in batch)  # trained positions, padding left out
        gnorm = global_grad_norm(net, rt)
        skipped = guard.check(loss, float(gnorm))  # the same on every rank: loss and norm are global
        if skipped is None:
            clip_(net, gnorm, t.grad_clip)
            opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - tic
        row = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": float(gnorm), "tokens": positions,
               "loss_tokens": loss_tokens, "tokens_per_s": positions / dt, "time": time.perf_counter() - t0,
               "skipped": skipped}
        history.append(row)
        if skipped or (step + 1) % t.log_every == 0 or step + 1 == total:
            log.write(row, total)
        guard.stop_if_exhausted(step + 1)  # TrainingStopped: no checkpoint of this state
        # A skipped step saves no checkpoint: it would restate the previous weights under a later step,
        # and resuming from it would never retry the batches that failed.
        if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and skipped is None:
            guard.saved(save(step + 1))
            saved = step + 1
    finish(save, total, saved, cfg, rt, log)
    return history
