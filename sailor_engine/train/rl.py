"""The RL loop (DUPO / WebSailor-V2 under cfg.algo): colocated rollouts, rewards, DUPO batch, mini-batch updates.

    rt = init_runtime(cfg)              # train.mode = rl
    history = train_rl(cfg, rt)         # list of the per-step metrics (also in out_dir/metrics.jsonl)

One RL step:
1. Questions: train.rl.questions_per_step questions of the pool (train/pool.py: tasks.train.jsonl,
   or its first train.rl.pool_size), the first of a permutation of the active ones seeded by
   (train.seed, step): a pure function of the step and the pool state, which checkpoints carry.
   With algo.dynamic_sampling (DAPO) further rounds draw the next questions of that permutation
   until questions_per_step informative groups are found or algo.max_sampling_rounds rounds ran
   (`step_rollouts`); the batch is then those groups (DynamicSampler), partial if they fall short.
2. Rollouts (train/rollouts.py): algo.group_size ReAct episodes per question on the trainer's own
   module, split over the dp x pp ranks, seeded per episode so that a trajectory does not depend on
   which rank generated it, gathered on every rank.
3. Rewards: every rank holds the same scores (offline, or an LLM judge asked once) and builds the
   same DUPO batch (build_batch, generator seeded by (algo.seed, step)); the slots are shuffled by the
   same generator and split into algo.updates_per_batch mini-batches.
4. Updates: for each mini-batch, its sequences are dealt to the dp ranks and packed into
   micro-batches exactly as the RFT loop does (`deal`, `micro_batches`); rl_loss over the fused
   log-probs (temperature of the rollout) with old_logp = the sampling log-probs, normalised by
   `global_norm` over the mini-batch (all micro-batches x dp ranks); grad norm over every shard, clip,
   AdamW at train.rl.lr (schedule in optimizer steps). The first update is on-policy (ratio 1 up to
   the sampling / training numerics, logged as logp_mismatch_max), later ones are not.
A step with no informative group (or no loss token) is logged with `skipped` = its reason and no update.
An update whose loss or grad norm is not finite is skipped (`skipped` names its mini-batch, the
step saves no checkpoint); train.max_nonfinite_steps such updates in a row stop the run (train/guards.py).
Checkpoints and resume as RFT (model, optimizer, step; the data position is the step itself), plus
the pool state (dropped and retired ids) in the manifest's extra.

The pool (algo.prefilter != none): before the first step, a pre-filter pass rolls out G episodes of
each pool question (the first train.rl.prefilter_tasks, if set) with the initial policy and drops
those all G solve (and, for solved_or_failed, all G fail): a metrics line with step 0 and phase
"prefilter". During RL (train.rl.pool_refresh) a question whose group, at its latest draw, was all
correct (or all wrong, solved_or_failed) is retired; every step's line has pool_active and
pool_retired. A step draws all the pool holds when it holds fewer than questions_per_step; when it
holds fewer than algo.updates_per_batch the run stops cleanly there (message, checkpoint, export).

Layouts: tp, pp and DDP or FSDP2, for the rollouts as train/rollouts.py says. The updates run the
micro-batches through the pipeline stages by 1F1B under pp (the statistics come from the last stage);
with algo.kl_coef the last stage alone holds the reference and runs its whole forward.

Optional terms (the papers use none): algo.judge, an LLM endpoint deciding the answers exact match
rejects (`score_rollouts`); algo.kl_coef, a KL penalty to the policy RL started from
(`reference_stage`: a second, frozen copy of the weights, one more forward per micro-batch);
algo.entropy_coef, an entropy bonus through the fused kernel's differentiable entropy.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sailor_engine.config import Config, ConfigError
from sailor_engine.env.runner import ToolLimits, ToolRunner
from sailor_engine.env.tools import SearchTool, VisitTool
from sailor_engine.kernels.logprob import fused_linear_logprob
from sailor_engine.model import Tokenizer
from sailor_engine.parallel.checkpoint import read_manifest
from sailor_engine.parallel.data import grad_sync, set_grad_sync, unwrap
from sailor_engine.parallel.pipeline import MicroBatch, PipelineStage, one_f_one_b, stage_layers
from sailor_engine.rl.dupo import DynamicSampler, GroupBatch, RLBatch, build_batch, finalize
from sailor_engine.rl.loss import global_norm, kl_penalty, rl_loss
from sailor_engine.rollout.format import ChatTemplate
from sailor_engine.synth.pipeline import load_world
from sailor_engine.train.batching import Sequence, pack
from sailor_engine.train.guards import NonFiniteGuard
from sailor_engine.train.pool import QuestionPool, draw_order, prefilter_pass
from sailor_engine.train.rft import (_ckpt_root, _Log, clip_, deal, finish, fresh_start, global_grad_norm,
                                     micro_batches, resume_latest, save_step)
from sailor_engine.train.rollouts import Rollouts, episodes_per_step, merge_rollouts, roll_out, save_rollouts
from sailor_engine.train.schedule import lr_at
from sailor_engine.train.setup import Runtime, build_model, build_optimizer, wrap_model

# -- config checks -----------------------------------------------------------------------------


def check_rl_config(cfg: Config, rt: Runtime, num_tasks: int) -> None:
    """ConfigError naming the field for anything the RL trainer cannot run."""
    a = cfg.algo
    if a.judge is not None and a.judge.api_key_env is not None and not os.environ.get(a.judge.api_key_env):
        raise ConfigError(f"algo.judge.api_key_env: environment variable {a.judge.api_key_env} is not set")
    if set(cfg.rollout.tools) - {"search", "visit"}:
        raise ConfigError(f"rollout.tools = {list(cfg.rollout.tools)}: the RL trainer offers search and visit only")
    q, size = cfg.train.rl.questions_per_step, cfg.train.rl.pool_size
    if size is not None and size > num_tasks:
        raise ConfigError(f"train.rl.pool_size ({size}) is larger than the {num_tasks} training tasks "
                          "of train.data_dir")
    if q > num_tasks:
        raise ConfigError(f"train.rl.questions_per_step ({q}) is larger than the {num_tasks} training tasks "
                          "of train.data_dir")
    if size is not None and q > size:
        raise ConfigError(f"train.rl.questions_per_step ({q}) is larger than train.rl.pool_size ({size})")
    if q < a.updates_per_batch:
        raise ConfigError(f"train.rl.questions_per_step ({q}) must be >= algo.updates_per_batch "
                          f"({a.updates_per_batch}): each mini-batch holds at least one group")


# -- data order --------------------------------------------------------------------------------


def step_tasks(step: int, num_tasks: int, count: int, seed: int) -> list[int]:
    """The training tasks of RL step `step` from a full pool: the first `count` of its permutation (pool.py)."""
    return draw_order(seed, step, num_tasks)[:count]


# -- the step's batch ---------------------------------------------------------------------------


def rl_batch(ro: Rollouts, cfg: Config, step: int,
             groups: GroupBatch | None = None) -> tuple[RLBatch, list[list[tuple[Sequence, float]]]]:
    """The batch of a step and its mini-batches: (sequence, advantage) per trajectory of each.

    groups: dynamic sampling's selection (DynamicSampler.result() over every round of `ro`); None:
    build_batch's (DUPO or every group). A partial dynamic batch of fewer groups than
    algo.updates_per_batch gives one mini-batch per group (no empty update).
    """
    G, U = cfg.algo.group_size, cfg.algo.updates_per_batch
    shape = (-1, G)
    truncated = torch.tensor([t.status in ("max_turns", "max_context") for t in ro.trajs]).view(shape)
    rewards, correct = ro.scored.rewards.view(shape), ro.scored.correct.view(shape)
    g = torch.Generator().manual_seed(cfg.algo.seed * 1_000_003 + step)
    if groups is None:
        batch = build_batch(rewards, correct, truncated, cfg.algo, g)
    else:
        batch = finalize(rewards, correct, truncated, groups, cfg.algo)
    if batch.skip_reason is not None:
        return batch, []
    slots = torch.randperm(len(batch.index), generator=g).tolist()  # duplicates spread over mini-batches
    minis = []
    for chunk in torch.tensor_split(torch.tensor(slots), min(U, len(slots))):
        mb = []
        for slot in chunk.tolist():
            grp = int(batch.index[slot])
            for j in range(G):
                t = ro.trajs[grp * G + j]
                mask = t.loss_mask if bool(batch.seq_keep[slot, j]) else [0] * len(t.loss_mask)
                mb.append((Sequence(t.token_ids, mask, t.logprobs), float(batch.advantages[slot, j])))
        minis.append(mb)
    return batch, minis


# -- the step's questions: pool draws, dynamic sampling, the pre-filter pass ---------------------


def step_rollouts(roll, pool: QuestionPool, step: int, cfg: Config) -> tuple[list[int], Rollouts, GroupBatch | None]:
    """The step's questions (pool ids over every round), their rollouts, and dynamic sampling's selection.

    roll(ids, step, first_episode) -> the Rollouts of those pool ids. Without algo.dynamic_sampling:
    one round of questions_per_step questions (all the pool holds, if fewer). With it (DAPO): rounds
    of fresh questions until questions_per_step informative groups are found, algo.max_sampling_rounds
    rounds ran, or the step's permutation of the pool is used up; surplus groups are left out.
    """
    a, q, G = cfg.algo, cfg.train.rl.questions_per_step, cfg.algo.group_size
    sampler = DynamicSampler(q, criterion=a.zero_variance, max_rounds=a.max_sampling_rounds) \
        if a.dynamic_sampling else None
    ids: list[int] = []
    parts: list[Rollouts] = []
    for rnd in range(a.max_sampling_rounds if sampler else 1):
        drawn = pool.draw(cfg.train.seed, step, rnd, q)
        if not drawn:
            break
        ro = roll(drawn, step, rnd * q * G)
        ids += drawn
        parts.append(ro)
        if sampler is not None:
            sampler.add(ro.scored.rewards.view(-1, G), ro.scored.correct.view(-1, G))
            if sampler.done:
                break
    return ids, merge_rollouts(parts), sampler.result() if sampler else None


def run_prefilter(roll, pool: QuestionPool, cfg: Config) -> dict:
    """The pre-filter pass with the initial policy (algo.prefilter, train.rl.prefilter_tasks); its metrics row.

    Chunks of one step's worth of questions; chunk c rolls out as step -1 - c, so its episode seeds
    are none of a training step's (distinct while steps + chunks < 1_000_003, as episode_seed's).
    """
    G, tic = cfg.algo.group_size, time.perf_counter()
    seen = {"episodes": 0, "correct": 0, "rollout_tokens": 0}

    def verdicts(ids: list[int], c: int) -> torch.Tensor:
        ro = roll(ids, -1 - c, 0)
        seen["episodes"] += len(ro.trajs)
        seen["correct"] += int(ro.scored.correct.sum())
        seen["rollout_tokens"] += sum(t.num_generated for t in ro.trajs)
        return ro.scored.correct.view(-1, G)

    stats = prefilter_pass(pool, verdicts, cfg.algo.prefilter, episodes_per_step(cfg) // G,
                           cfg.train.rl.prefilter_tasks)
    return {"step": 0, "phase": "prefilter", "prefilter": cfg.algo.prefilter,
            **{f"prefilter_{k}": v for k, v in stats.items()}, "episodes": seen["episodes"],
            "accuracy": seen["correct"] / seen["episodes"], "rollout_tokens": seen["rollout_tokens"],
            "time_prefilter": time.perf_counter() - tic}


# -- one update --------------------------------------------------------------------------------


def run_update(stage, model, mini: list[tuple[Sequence, float]], cfg: Config, rt: Runtime,
               ref=None) -> dict | None:
    """Forward + backward of this rank's share of one mini-batch; returns its global stats (None: no loss token).

    Stats over the loss tokens: the clip fractions, `entropy` (mean entropy of the policy at the
    rollout temperature, from the fused kernel), `kl_old` (k3 estimate of KL(pi_old || pi_theta) on
    the sampled tokens: how far this update's policy has moved from the sampling one) and, with a
    reference stage `ref` (algo.kl_coef > 0: the policy at the start of RL, frozen, whole; under pp
    on the last stage only), `kl_ref`, the algo.kl_estimator KL to it that the loss is penalised with.

    Under bf16 (rt.compute_dtype) the forward runs under autocast, but the Generator sampled with the
    fp32 module: the first update's logp_mismatch_max is then bf16 noise, which grows with the logits
    (the test_rl world: ~4e-6 in fp32, ~0.2 in bf16 on its memorised RFT model, first-update clip
    fractions still 0; bf16 on the LM head alone moves it little), not a bug. Rollouts stay fp32: the
    Generator's logits and KV cache are fp32, and an autocast around it would round its logits to bf16.
    """
    adv = {id(s): a for s, a in mini}
    seqs = [s for s, _ in mini]
    mbs = micro_batches(deal(seqs, rt.dp), cfg.train.micro_batch_tokens, rt.dp_rank,
                        cfg.parallel.pp_microbatches if rt.pp > 1 else 1)
    packed = [pack(mb).to(rt.device) for mb in mbs]
    norm = global_norm([p.loss_mask for p in packed], [p.seq_ids for p in packed], dp_group=rt.dp_group)
    if norm.num_tokens == 0:
        return None
    temperature = cfg.rollout.temperature or 1.0  # greedy samples log-probs at T = 1
    # loss, clipped low, clipped high, tokens, entropy, KL(sampling || current), KL to ref: sums over loss tokens
    sums = torch.zeros(7, dtype=torch.float64, device=rt.device)
    mismatch = torch.zeros(1, dtype=torch.float64, device=rt.device)
    xs = [MicroBatch.packed(p.input_ids, p.cu_seqlens) for p in packed]
    net = unwrap(stage)

    def loss_fn(hidden: torch.Tensor, i: int) -> torch.Tensor:  # micro-batch i's share, on the last stage
        nonlocal mismatch
        p, x = packed[i], xs[i]
        old = p.old_logp if p.old_logp is not None else torch.zeros_like(p.loss_mask)  # a padding micro-batch
        a = torch.tensor([adv.get(id(s), 0.0) for s in mbs[i]], dtype=torch.float32, device=rt.device)
        targets = p.loss_targets  # the head runs on loss rows only (logp, entropy 0 elsewhere)
        logp, ent = fused_linear_logprob(*rt.head_inputs(hidden, net.output_weight), targets,
                                         tp_group=model.tp_group, temperature=temperature, return_entropy=True)
        ref_logp = None
        if ref is not None:
            with torch.no_grad(), rt.autocast():
                ref_hidden = ref(x.input_ids, x.cu_seqlens, x.positions)
            ref_logp = fused_linear_logprob(*rt.head_inputs(ref_hidden, ref.output_weight), targets,
                                            tp_group=model.tp_group, temperature=temperature)
        loss, st = rl_loss(logp, old, a, p.loss_mask, norm, cfg.algo, seq_ids=p.seq_ids, ref_logp=ref_logp,
                           entropy=ent if cfg.algo.entropy_coef > 0 else None)
        n = float(st["num_tokens"])
        on = p.loss_mask != 0
        # k3 of x = logp - old on tokens sampled from the old policy: an unbiased, non-negative
        # estimate of KL(pi_old || pi_theta), ~0 at the first update (numerics), growing with the updates
        kl = torch.where(on, kl_penalty(old, logp.detach(), "k3"), 0.0).sum()
        sums.add_(torch.tensor([float(loss.detach()), float(st["clip_frac_low"]) * n,
                                float(st["clip_frac_high"]) * n, n, float((ent.detach() * on).sum()), float(kl),
                                float(st["kl_mean"]) * n], dtype=torch.float64, device=rt.device))
        diff = ((logp.detach() - old).abs() * on).max() if on.numel() else 0.0
        mismatch = torch.maximum(mismatch, torch.as_tensor(float(diff), dtype=torch.float64, device=rt.device))
        return loss

    if rt.pp > 1:
        sync = (lambda i, is_last: set_grad_sync(stage, is_last)) if rt.dp > 1 else None  # noqa: E731
        one_f_one_b(rt.autocast_calls(stage), xs if net.is_first else None, loss_fn if net.is_last else None,
                    rt.groups.pp, before_backward=sync)
        dist.all_reduce(sums, group=rt.groups.pp)  # the stats live on the last stage (zeros elsewhere)
        dist.all_reduce(mismatch, op=dist.ReduceOp.MAX, group=rt.groups.pp)
    else:
        for i, x in enumerate(xs):
            with grad_sync(stage, i == len(xs) - 1):  # dp reduction once, after the last backward
                with rt.autocast():  # the forward only (setup.Runtime); log-probs and loss stay fp32
                    hidden = stage(x.input_ids, x.cu_seqlens, x.positions)
                loss_fn(hidden, i).backward()
    if rt.dp_group is not None:
        dist.all_reduce(sums, group=rt.dp_group)
        dist.all_reduce(mismatch, op=dist.ReduceOp.MAX, group=rt.dp_group)
    loss, low, high, n, ent, kl, kl_ref = sums.tolist()
    return {"loss": loss, "clip_frac_low": low / n, "clip_frac_high": high / n, "loss_tokens": int(n),
            "entropy": ent / n, "kl_old": kl / n, **({"kl_ref": kl_ref / n} if cfg.algo.kl_coef > 0 else {}),
            "logp_mismatch_max": float(mismatch), "tokens": sum(len(s.token_ids) - 1 for s in seqs)}


# -- metrics -----------------------------------------------------------------------------------


def rollout_metrics(ro: Rollouts, batch: RLBatch) -> dict:
    """Reward, accuracy, DUPO counts, turns, tool calls and errors, rollout throughput of one step."""
    trajs, s = ro.trajs, ro.scored
    calls = [c for t in trajs for c in t.tool_calls]
    generated = sum(t.num_generated for t in trajs)
    status = [t.status for t in trajs]
    row = {"reward_mean": float(s.rewards.mean()), "accuracy": float(s.correct.float().mean()),
           "format_ok": float(s.format_ok.float().mean()), "episodes": len(trajs),
           "answered": status.count("answered"), "max_turns": status.count("max_turns"),
           "max_context": status.count("max_context"),
           "turns_mean": sum(t.turns for t in trajs) / len(trajs), "tool_calls": len(calls),
           "tool_errors": sum(not c.ok for c in calls), "tool_timeouts": sum(c.error_kind == "timeout" for c in calls),
           "tool_cache_hits": sum(c.cached for c in calls), "format_errors": sum(t.format_errors for t in trajs),
           "response_tokens_mean": generated / len(trajs), "response_tokens_max": max(t.num_generated for t in trajs),
           "rollout_tokens": generated, "rollout_tokens_per_s": generated / max(ro.wall_s, 1e-9),
           "time_rollout": ro.wall_s, "time_decode": ro.decode_s, "time_tool_wait": ro.tool_wait_s}
    row.update({f"dupo_{k}": v for k, v in batch.stats.items()})
    if "judge_retries" in s.stats:  # algo.judge: its calls, retries and exact-match fallbacks
        row.update({k: v for k, v in s.stats.items() if k.startswith("judge_")})
    return row


class _RLLog(_Log):
    def progress(self, row: dict, total: int) -> None:
        # entropy of the sampling policy (the first update's), KL moved by the step's last update
        train = (f"loss {row['loss']:.4f}  grad_norm {row['grad_norm']:.3f}  entropy {row['entropy'][0]:.3f}  "
                 f"kl {row['kl_old'][-1]:.1e}" if row["skipped"] is None else f"skipped: {row['skipped']}")
        print(f"rl step {row['step']}/{total}  reward {row['reward_mean']:.3f}  acc {row['accuracy']:.3f}  {train}  "
              f"rollout {row['time_rollout']:.1f}s train {row['time_train']:.1f}s", flush=True)


# -- checkpoints -------------------------------------------------------------------------------


def _run_key(cfg: Config, pool_tasks: list) -> dict:
    """What a checkpoint must share with this run to be resumed by it (what draws and seeds depend on).
    The pool's task ids enter as a digest: the pool state holds indices into them, so any setting that
    picks the tasks (train.rl.exclude_expert_tasks, balance_hops, another data_dir) must agree."""
    a = cfg.algo
    ids = hashlib.blake2b("\n".join(t.id for t in pool_tasks).encode(), digest_size=16).hexdigest()
    return {"mode": "rl", "seed": cfg.train.seed, "questions_per_step": cfg.train.rl.questions_per_step,
            "group_size": a.group_size, "prefilter": a.prefilter, "pool_refresh": cfg.train.rl.pool_refresh,
            "dynamic_sampling": a.dynamic_sampling, "episodes_per_step": episodes_per_step(cfg), "pool_tasks": ids}


def _restore_pool(cfg: Config, step: int) -> QuestionPool:
    """The pool as it was after step `step`, from that checkpoint's manifest (resume_latest loaded it)."""
    return QuestionPool.from_state(read_manifest(_ckpt_root(cfg) / f"step-{step:08d}")["extra"]["pool"])


# -- the loop ----------------------------------------------------------------------------------


def _world(cfg: Config):
    d = Path(cfg.train.data_dir)
    missing = [f for f in ("tasks.train.jsonl", "corpus.jsonl", "index", "tokenizer.json") if not (d / f).exists()]
    if missing:
        raise ConfigError(f"train.data_dir = {str(d)!r}: no {', '.join(missing)} there "
                          "(expected a `sailor-engine synth --out DIR` output)")
    return load_world(d, cfg.synth)


def rl_tasks(world, cfg: Config) -> list:
    """The tasks the RL pool indexes, in file order: tasks.train.jsonl, without the expert trajectories'
    tasks under train.rl.exclude_expert_tasks (RL on questions RFT memorised teaches little; see
    synth.expert_fraction), then cut to equal counts per hop count under train.rl.balance_hops."""
    tasks = world.train
    if cfg.train.rl.exclude_expert_tasks:
        seen = {e.task_id for e in world.experts}
        tasks = [t for t in tasks if t.id not in seen]
        if not tasks:
            raise ConfigError(f"train.rl.exclude_expert_tasks: every one of the {len(world.train)} training tasks "
                              f"of train.data_dir has an expert trajectory; synthesize with synth.expert_fraction < 1")
    if cfg.train.rl.balance_hops:
        by_hops: dict[int, list] = {}
        for t in tasks:
            by_hops.setdefault(t.hops, []).append(t)
        n = min(map(len, by_hops.values()))
        keep = {t.id for group in by_hops.values() for t in group[:n]}
        tasks = [t for t in tasks if t.id in keep]
    return tasks


def _log_prefilter(log: _Log, row: dict) -> None:
    """The pre-filter pass's metrics.jsonl line (step 0: kept when a resume cuts the file back) and progress line."""
    if not log.enabled:
        return
    log.record(row)
    print(f"rl prefilter ({row['prefilter']}): kept {row['prefilter_kept']} of {row['prefilter_questions']} "
          f"questions ({row['prefilter_solved']} always solved, {row['prefilter_failed']} never), pool "
          f"{row['prefilter_active']}, {row['time_prefilter']:.1f}s", flush=True)


def _pool_exhausted(pool: QuestionPool, step: int, cfg: Config, rt: Runtime) -> None:
    if rt.rank == 0:
        print(f"rl: stopping after step {step} of {cfg.train.rl.steps}: the question pool holds "
              f"{len(pool.active)} question(s), fewer than algo.updates_per_batch ({cfg.algo.updates_per_batch}) "
              f"({len(pool.dropped)} dropped by the pre-filter, {len(pool.retired)} retired during RL); the "
              f"checkpoint and export are of step {step}", flush=True)


def train_rl(cfg: Config, rt: Runtime) -> list[dict]:
    """Run (or resume) the RL phase; returns this run's per-step metrics (on every rank)."""
    t = cfg.train
    world = _world(cfg)
    pool_tasks = rl_tasks(world, cfg)
    check_rl_config(cfg, rt, len(pool_tasks))
    tok = Tokenizer(world.tokenizer)
    tpl = ChatTemplate(tok)
    # The system prompt the expert trajectories (so the RFT model) were rendered with.
    system = world.system_prompt
    model = build_model(cfg, tok.vocab_size, rt)
    stage = wrap_model(model, cfg, rt)
    net = unwrap(stage)
    opt = build_optimizer(net.parameters(), cfg)
    # the reference's forward runs where the loss is computed: on the last pipeline stage, whole
    ref = reference_stage(cfg, tok.vocab_size, rt) if cfg.algo.kl_coef > 0 and (rt.pp == 1 or net.is_last) else None
    for g in opt.param_groups:
        g["weight_decay"] = t.rl.weight_decay
    key = _run_key(cfg, pool_tasks)
    start = resume_latest(model, net, opt, cfg, rt, key, "is not a checkpoint of this RL run",
                          "another train.out_dir (train.init_from for an RFT checkpoint)") if t.resume else fresh_start(cfg)
    log = _RLLog(Path(t.out_dir) / "metrics.jsonl", start, rt.rank == 0, cfg)
    history, saved, t0 = [], start if start > 0 else None, time.perf_counter()
    guard = NonFiniteGuard(t.max_nonfinite_steps, _ckpt_root(cfg) / f"step-{start:08d}" if start > 0 else None)
    pool = _restore_pool(cfg, start) if start > 0 else QuestionPool(t.rl.pool_size or len(pool_tasks))
    last = t.rl.steps  # the final step: earlier if the pool runs out
    save = lambda step: save_step(model, net, opt, cfg, rt, step, {**key, "pool": pool.state()})  # noqa: E731
    limits = ToolLimits(timeout_s=cfg.rollout.tool_timeout_s)
    tools = {"search": SearchTool(world.web), "visit": VisitTool(world.web)}
    with ToolRunner([tools[n] for n in cfg.rollout.tools], limits=limits,
                    cache_size=cfg.rollout.tool_cache_size, seed=t.seed) as runner:
        def roll(ids: list[int], step: int, first_episode: int) -> Rollouts:
            tasks = [pool_tasks[i] for i in ids]
            return roll_out(model, runner, tpl, system, tasks, step, cfg, rt, first_episode, stage)

        if start == 0 and cfg.algo.prefilter != "none":
            _log_prefilter(log, run_prefilter(roll, pool, cfg))
        for step in range(start, t.rl.steps):
            if len(pool.active) < cfg.algo.updates_per_batch:
                last = step
                _pool_exhausted(pool, step, cfg, rt)
                break
            ids, ro, groups = step_rollouts(roll, pool, step, cfg)
            if t.rl.save_rollouts and rt.rank == 0:
                save_rollouts(t.out_dir, step + 1, ro)
            batch, minis = rl_batch(ro, cfg, step, groups)
            retired = (pool.update(ids, ro.scored.correct.view(-1, cfg.algo.group_size), cfg.algo.prefilter)
                       if t.rl.pool_refresh else [])
            row = {"step": step + 1, **rollout_metrics(ro, batch),
                   **_train(stage, model, net, opt, minis, step, cfg, rt, guard, ref),
                   "questions": len(ids), "pool_active": len(pool.active), "pool_retired": len(retired)}
            if row["skipped"] is None and batch.skip_reason is not None:
                row["skipped"] = batch.skip_reason
            row["time"] = time.perf_counter() - t0
            history.append(row)
            if (step + 1) % t.log_every == 0 or step + 1 == t.rl.steps:
                log.write(row, t.rl.steps)
            guard.stop_if_exhausted(step + 1)  # TrainingStopped: no checkpoint of this state
            if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and not row["nonfinite_updates"]:
                guard.saved(save(step + 1))
                saved = step + 1
    finish(save, last, saved, cfg, rt, log)
    return history


def reference_stage(cfg: Config, vocab_size: int, rt: Runtime) -> PipelineStage:
    """The frozen reference policy of algo.kl_coef: the model RL starts from (train.init_from, or the
    seeded random init), rebuilt from its source, so a resumed run penalises against the same one.
    A second copy of the model's weights, in eval mode (no dropout either way), without gradients."""
    ref = build_model(cfg, vocab_size, rt).eval().requires_grad_(False)
    return PipelineStage(ref, stage_layers(ref.cfg, 1)[0], 0, 1)


def _train(stage, model, net, opt, minis: list, step: int, cfg: Config, rt: Runtime, guard: NonFiniteGuard,
           ref: PipelineStage | None = None) -> dict:
    """algo.updates_per_batch optimizer steps, one per mini-batch; their metrics (lists per update, of the
    updates applied). An update with a non-finite loss or grad norm is skipped (guard); once the guard
    is exhausted the step's remaining mini-batches are left out and the caller stops the run."""
    t, U = cfg.train, cfg.algo.updates_per_batch
    tic = time.perf_counter()
    ups: list[dict] = []
    reasons: list[str] = []
    nonfinite = 0
    for u, mini in enumerate(minis):
        k = step * U + u  # optimizer step of the schedule
        lr = lr_at(k, peak=t.rl.lr, warmup_steps=t.rl.warmup_steps, total_steps=t.rl.steps * U,
                   min_lr_ratio=t.rl.min_lr_ratio, schedule=t.rl.schedule)
        for g in opt.param_groups:
            g["lr"] = lr
        st = run_update(stage, model, mini, cfg, rt, ref)
        if st is None:
            opt.zero_grad(set_to_none=True)
            reasons.append(f"mini-batch {u}: no loss token (every trajectory excluded)")
            continue
        gnorm = global_grad_norm(net, rt)
        bad = guard.check(st["loss"], float(gnorm))  # the same on every rank: loss and norm are global
        if bad is not None:
            opt.zero_grad(set_to_none=True)
            reasons.append(f"mini-batch {u}: {bad} (loss {st['loss']}, grad_norm {float(gnorm)})")
            nonfinite += 1
            if guard.exhausted:
                break
            continue
        clip_(net, gnorm, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ups.append(dict(st, lr=lr, grad_norm=float(gnorm), update=u))
    dt = time.perf_counter() - tic
    skipped = "; ".join(reasons) or None
    if not ups:
        return {"skipped": skipped, "nonfinite_updates": nonfinite, "loss": None, "losses": [], "grad_norm": None,
                "grad_norms": [], "lr": None, "time_train": dt, "train_tokens_per_s": 0.0}
    tokens = sum(x["tokens"] for x in ups)
    return {"skipped": skipped, "nonfinite_updates": nonfinite, "loss": sum(x["loss"] for x in ups) / len(ups),
            "losses": [x["loss"] for x in ups],
            "grad_norm": ups[-1]["grad_norm"], "grad_norms": [x["grad_norm"] for x in ups], "lr": ups[-1]["lr"],
            "loss_tokens": sum(x["loss_tokens"] for x in ups), "train_tokens": tokens,
            **{k: [x[k] for x in ups] for k in ("clip_frac_low", "clip_frac_high", "entropy", "kl_old", "kl_ref")
               if k in ups[0]},  # one entry per update; kl_ref with algo.kl_coef only
            # the first update's policy is the sampling policy: any difference is numerics
            "logp_mismatch_max": ups[0]["logp_mismatch_max"] if ups[0]["update"] == 0 else None,
            "time_train": dt, "train_tokens_per_s": tokens / dt}
