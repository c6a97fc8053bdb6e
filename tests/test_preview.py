"""The demo preview runs every stage end to end on a small world (a smoke test of the wiring)."""

import torch

from sailor_engine.train.preview import demo_config, run_preview


def test_preview_runs_every_stage():
    cfg = demo_config(overrides=("synth.num_entities=150", "synth.num_questions=120", "rollout.max_turns=2",
                                 "rollout.max_new_tokens=24", "algo.group_size=2"))
    res = run_preview(cfg, rft_steps=3, rl_tasks=3)
    assert len(res.rft_loss) == 3 and all(torch.isfinite(torch.tensor(res.rft_loss)))
    assert res.rft_loss[-1] < res.rft_loss[0]
    assert len(res.rollouts) == 6
    for t in res.rollouts:
        assert len(t.token_ids) == len(t.loss_mask) == len(t.logprobs)
        assert t.status in ("answered", "max_turns", "max_context")
    assert (res.rl_loss is None) == (res.skip_reason is not None)
