"""Train section of the config: the RFT cold start and the RL loop, optimizer, checkpoints, eval, logging.

A frozen msgspec Struct (validated on decode, hashable); sailor_engine.config composes it with the
other sections. Purely declarative: the trainer reads it.

The two phases keep their own learning-rate schedule and batch size (train.rft, train.rl), because
the papers use different ones (RFT: lr 5e-6, warmup + cosine, weight decay 0.1, batch 32; RL: lr
1e-6, 128 questions per batch in mini-batches of 32, <= 50 steps) and `sailor-engine demo` runs
both from one config. The algorithm itself (G, clipping, DUPO, updates per batch) is the algo section.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

Beta = Annotated[float, Meta(ge=0, lt=1)]


class RFTConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Rejection-sampling fine-tuning on expert trajectories; loss on policy tokens only."""

    lr: Annotated[float, Meta(gt=0, description="Peak learning rate (paper: 5e-6).")] = 5e-6
    schedule: Annotated[Literal["cosine", "constant"], Meta(description="After warmup: cosine decay to lr * min_lr_ratio (paper), or constant.")] = "cosine"
    warmup_steps: Annotated[int, Meta(ge=0, description="Linear warmup from 0 to lr, in optimizer steps.")] = 10
    min_lr_ratio: Annotated[float, Meta(ge=0, le=1, description="Final lr of the cosine schedule, as a fraction of lr.")] = 0.1
    weight_decay: Annotated[float, Meta(ge=0, description="AdamW decoupled weight decay (paper: 0.1).")] = 0.1
    batch_size: Annotated[int, Meta(ge=1, description="Trajectories per optimizer step, over all dp ranks (paper: 32).")] = 32
    epochs: Annotated[int, Meta(ge=1, description="Passes over the expert trajectories.")] = 1
    max_steps: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        Meta(description="Stop after this many optimizer steps even within an epoch; None: run the epochs."),
    ] = None


class RLConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The RL loop: rollouts of algo.group_size per question, then algo.updates_per_batch mini-batch updates."""

    lr: Annotated[float, Meta(gt=0, description="Peak learning rate (paper: 1e-6).")] = 1e-6
    schedule: Annotated[Literal["cosine", "constant"], Meta(description="After warmup: cosine decay to lr * min_lr_ratio, or constant.")] = "constant"
    warmup_steps: Annotated[int, Meta(ge=0, description="Linear warmup from 0 to lr, in optimizer steps.")] = 0
    min_lr_ratio: Annotated[float, Meta(ge=0, le=1, description="Final lr of the cosine schedule, as a fraction of lr.")] = 0.1
    weight_decay: Annotated[float, Meta(ge=0, description="AdamW decoupled weight decay (not published for RL; the RFT value).")] = 0.1
    questions_per_step: Annotated[int, Meta(ge=1, description="Questions per rollout batch, over all dp ranks (paper: 128); split into algo.updates_per_batch mini-batches (paper: 4 x 32).")] = 128
    steps: Annotated[int, Meta(ge=1, description="Rollout batches (paper: <= 50).")] = 50
    pool_size: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        Meta(description="RL question pool: the first this many tasks of tasks.train.jsonl; None: all of them."),
    ] = None
    prefilter_tasks: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        Meta(description="Pre-filter pass (algo.prefilter) over the first this many pool questions only, "
                         "algo.group_size rollouts each; the rest stay unfiltered. None: the whole pool."),
    ] = None
    exclude_expert_tasks: Annotated[bool, Meta(description="Leave the tasks that have expert trajectories (the RFT data) out of the RL pool: RL on questions the RFT model memorised teaches little (synth.expert_fraction < 1 leaves the others).")] = False
    balance_hops: Annotated[bool, Meta(description="Keep as many pool tasks of each hop count as of the rarest one (the first ones of each, in file order): on a mostly 1-hop pool RL learns to answer after the first page and 2-hop accuracy falls (the demo's calibration).")] = False
    pool_refresh: Annotated[bool, Meta(description="During RL, retire a question whose latest group was all correct (also all wrong under algo.prefilter=solved_or_failed); no effect when algo.prefilter=none.")] = True
    save_rollouts: Annotated[bool, Meta(description="Write every step's trajectories (tokens, sampling log-probs, tool calls, rewards) to out_dir/rollouts/step-NNNNNNNN.jsonl, from global rank 0 (train/rollouts.py: load_rollouts reads them). Tens of MB per step at the paper's scale.")] = False


class DrillConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Copy drills (train/drills.py) for a from-scratch model before RFT: random sequences written twice."""

    steps: Annotated[int, Meta(ge=0, description="Drill steps; 0: none (a pretrained model copies already).")] = 0
    lr: Annotated[float, Meta(gt=0, description="Learning rate after warmup (AdamW, betas 0.9 / 0.95, no weight decay).")] = 1e-3
    warmup_steps: Annotated[int, Meta(ge=0, description="Linear warmup from 0 to lr.")] = 50
    batch_size: Annotated[int, Meta(ge=1, description="Sequences per step.")] = 32
    min_len: Annotated[int, Meta(ge=2, description="Shortest random sequence (each is written twice).")] = 8
    max_len: Annotated[int, Meta(ge=2, description="Longest random sequence.")] = 40

    def __post_init__(self) -> None:
        if self.min_len > self.max_len:
            raise ValueError(f"train.drill.min_len ({self.min_len}) must be <= train.drill.max_len ({self.max_len})")


class TrainConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What `torchrun -m sailor_engine.train` runs and where it writes."""

    mode: Annotated[Literal["rft", "rl"], Meta(description="Phase to run: rft (cold start on expert trajectories) or rl.")] = "rft"
    seed: Annotated[int, Meta(ge=0, description="Seed of initialisation, data order and sampling.")] = 0
    out_dir: Annotated[str, Meta(min_length=1, description="Run directory: checkpoints, metrics.jsonl, plots.")] = "runs/default"
    data_dir: Annotated[str, Meta(min_length=1, description="A `sailor-engine synth` output: tasks, corpus, search index, tokenizer.json, expert trajectories.")] = "runs/data"
    init_from: Annotated[str | None, Meta(description="HF directory or engine checkpoint to start from; None: random init from the model section.")] = None
    resume: Annotated[bool, Meta(description="Continue from the newest checkpoint in out_dir if there is one.")] = True
    dtype: Annotated[Literal["auto", "float32", "bfloat16"], Meta(description="auto: bf16 autocast with fp32 master weights on CUDA, fp32 on CPU.")] = "auto"

    # -- optimizer (AdamW), shared by both phases --
    betas: Annotated[tuple[Beta, Beta], Meta(description="AdamW (beta1, beta2).")] = (0.9, 0.999)
    adam_eps: Annotated[float, Meta(gt=0, description="AdamW epsilon.")] = 1e-8
    grad_clip: Annotated[float, Meta(ge=0, description="Clip the global gradient norm to this; 0 is off.")] = 1.0
    micro_batch_tokens: Annotated[int, Meta(ge=1, description="Token budget of one packed micro-batch per rank; must hold the longest trajectory.")] = 32768
    max_nonfinite_steps: Annotated[int, Meta(ge=1, description="Consecutive steps skipped for non-finite loss or gradients before the run stops.")] = 3

    # -- checkpoints, eval, logging --
    checkpoint_every: Annotated[int, Meta(ge=0, description="Optimizer steps between checkpoints; 0: only at the end.")] = 50
    keep_last: Annotated[int, Meta(ge=1, description="Checkpoints kept; older ones are deleted after a new one is complete.")] = 2
    eval_every: Annotated[int, Meta(ge=0, description="Optimizer steps between evals; 0: only at the end.")] = 0
    eval_tasks: Annotated[int, Meta(ge=1, description="Held-out tasks (tasks.test.jsonl) for pass@1; ~1000 resolve a few points.")] = 1000
    eval_samples: Annotated[int, Meta(ge=0, description="Sampled rollouts per task for sampled pass@1, besides greedy; 0: greedy only.")] = 0
    log_every: Annotated[int, Meta(ge=1, description="Optimizer steps between metrics.jsonl lines.")] = 1
    tensorboard: Annotated[bool, Meta(description="Also write TensorBoard events to out_dir/tb.")] = False
    plots: Annotated[bool, Meta(description="Write PNG plots of the metric curves at the end.")] = True

    drill: Annotated[DrillConfig, Meta(description="Copy drills before RFT from a random init (the demo).")] = DrillConfig()
    rft: Annotated[RFTConfig, Meta(description="The RFT cold start.")] = RFTConfig()
    rl: Annotated[RLConfig, Meta(description="The RL loop.")] = RLConfig()
