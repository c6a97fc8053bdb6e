"""AlgoConfig: presets resolve unset recipe fields, explicit fields win, bad values name the field."""

import msgspec
import pytest

from sailor_engine.rl.config import PRESETS, AlgoConfig


def test_default_is_the_dupo_recipe():
    cfg = AlgoConfig()
    assert cfg.preset == "dupo"
    for name, value in PRESETS["dupo"].items():
        assert getattr(cfg, name) == value
    assert (cfg.eps_low, cfg.eps_high, cfg.kl_coef, cfg.entropy_coef) == (0.2, 0.28, 0.0, 0.0)
    assert (cfg.format_weight, cfg.answer_weight, cfg.zero_variance) == (0.1, 0.9, "correctness")


def test_sailor_v2_preset_and_overrides():
    cfg = msgspec.convert({"preset": "sailor_v2", "kl_coef": 0.01, "prefilter": "solved"}, AlgoConfig)
    assert cfg.advantage == "leave_one_out" and cfg.exclude_truncated_negatives and not cfg.dupo
    assert cfg.updates_per_batch == 1 and cfg.reward == "v2"
    assert cfg.kl_coef == 0.01 and cfg.prefilter == "solved"  # explicit fields win over the preset


@pytest.mark.parametrize("preset", list(PRESETS))
def test_round_trip_is_stable(preset):
    cfg = AlgoConfig(preset=preset, loss_agg="seq-mean-token-sum-norm", norm_length=512)
    again = msgspec.json.decode(msgspec.json.encode(cfg), type=AlgoConfig)
    assert again == cfg and hash(again) == hash(cfg)


@pytest.mark.parametrize("raw, match", [
    ({"dupo": True, "dynamic_sampling": True}, "algo.dynamic_sampling"),
    ({"loss_agg": "seq-mean-token-sum-norm"}, "algo.norm_length"),
    ({"dual_clip": 1.0}, "algo.dual_clip"),
    ({"eps_low": 1.5}, r"\$.eps_low"),
    ({"advantage": "ppo"}, r"\$.advantage"),
    ({"preset": "v3"}, r"\$.preset"),
    ({"kl_coeff": 0.1}, "kl_coeff"),
    ({"judge": {"base_url": "http://x"}}, r"\$.judge"),
])
def test_bad_config_names_the_field(raw, match):
    with pytest.raises(msgspec.ValidationError, match=match):
        msgspec.convert(raw, AlgoConfig)
