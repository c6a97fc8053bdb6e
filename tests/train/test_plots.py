"""train/plots.py: PNG plots of a metrics.jsonl and the TensorBoard sink.

Rows carry the keys train/rft.py and train/rl.py write (a skipped RL step: loss null, empty lists).
The PNGs are checked as files (signature, IHDR size, pixels that are not one flat colour), the
curves against points worked out by hand (lists spread over the step, nulls and NaN dropped),
and both optional-dependency errors by switching the detection flags.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from sailor_engine.train import plots
from sailor_engine.train.plots import PlotsUnavailable, TensorBoardSink, TensorBoardUnavailable, curves, write_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rft_row(step: int) -> dict:
    return {"step": step, "loss": 2.0 / step, "lr": 1e-3 * step, "grad_norm": 1.5, "tokens": 900, "loss_tokens": 400,
            "tokens_per_s": 1000.0 + step, "time": 0.5 * step}


def rl_row(step: int, skipped: bool = False) -> dict:
    row = {"step": step, "reward_mean": 0.1 * step, "accuracy": 0.05 * step, "format_ok": 0.9, "episodes": 32,
           "answered": 30, "max_turns": 2, "max_context": 0, "turns_mean": 3.5, "tool_calls": 80, "tool_errors": 1,
           "format_errors": 2, "rollout_tokens": 5000, "rollout_tokens_per_s": 300.0, "time_rollout": 12.0,
           "time_decode": 10.0, "time_tool_wait": 1.0, "dupo_groups": 4, "dupo_kept": 2, "dupo_dropped_all_correct": 1,
           "dupo_dropped_all_wrong": 1, "dupo_dropped_other": 0, "dupo_duplicated": 2, "time": 15.0 * step}
    if skipped:
        row.update(skipped="no informative group", loss=None, losses=[], grad_norm=None, grad_norms=[], lr=None,
                   time_train=0.01, train_tokens_per_s=0.0)
    else:
        row.update(skipped=None, loss=0.01 * step, losses=[0.01, 0.02], grad_norm=0.5, grad_norms=[0.4, 0.5], lr=1e-6,
                   loss_tokens=700, train_tokens=2000, clip_frac_low=[0.0, 0.1], clip_frac_high=[0.0, 0.2],
                   logp_mismatch_max=1e-6, time_train=3.0, train_tokens_per_s=666.0)
    return row


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path}: not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_drawn(path: Path) -> None:
    """A real PNG, big enough to hold axes, whose pixels are not one flat colour (something was drawn)."""
    w, h = png_size(path)
    assert w >= 300 and h >= 200, (path, w, h)
    assert path.stat().st_size > 8000, path
    Image = pytest.importorskip("PIL.Image")
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 20, f"{path}: blank image"


def test_rft_metrics_one_png_per_figure(tmp_path):
    m = write_jsonl(tmp_path / "metrics.jsonl", [rft_row(s) for s in range(1, 11)])
    paths = write_plots(m, tmp_path / "plots")
    # loss + lr + grad_norm; tokens_per_s; tokens + loss_tokens; time (cumulative wall clock)
    assert sorted(p.name for p in paths) == ["loss.png", "other.png", "throughput.png", "tokens.png"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)
    for p in paths:
        assert_drawn(p)


def test_rl_metrics_with_nulls_and_nan(tmp_path):
    rows = [rl_row(1), rl_row(2, skipped=True), rl_row(3)]
    rows[2]["grad_norm"] = math.nan  # json writes NaN; it must drop out, not blank the axis
    rows[0]["logp_mismatch_max"] = None  # a first update that was not update 0
    m = write_jsonl(tmp_path / "metrics.jsonl", rows)
    paths = write_plots(m, tmp_path / "plots")
    assert sorted(p.name for p in paths) == sorted(f"{n}.png" for n in (
        "dupo", "episodes", "loss", "other", "policy", "reward", "throughput", "time", "tokens"))
    for p in paths:
        assert_drawn(p)


def test_every_trainer_key_has_its_figure():
    keys = {k for r in (rft_row(1), rl_row(1)) for k, _ in plots.numeric_items(r)}
    got = {k: plots.figure_of(k) for k in keys}
    assert {k for k, f in got.items() if f == "other"} == {"time"}
    assert got["loss_tokens"] == "tokens" and got["loss"] == "loss" and got["losses"] == "loss"
    assert got["tokens_per_s"] == got["rollout_tokens_per_s"] == got["train_tokens_per_s"] == "throughput"
    assert got["clip_frac_low"] == got["logp_mismatch_max"] == "policy"
    assert got["answered"] == got["tool_errors"] == "episodes"
    assert got["time_rollout"] == "time" and got["dupo_kept"] == "dupo" and got["reward_mean"] == "reward"


def test_curve_points():
    rows = [rl_row(1), rl_row(2, skipped=True), rl_row(3)]
    rows[2]["grad_norm"] = math.nan
    rows[0]["losses"] = [0.01, None, 0.03]  # a list entry that is not a number keeps the others' places
    rows.append({"step": None, "loss": 5.0})  # no step: not plottable
    c = curves(rows)
    assert c["loss"]["loss"][""] == ([1.0, 3.0], [0.01, 0.03])
    assert c["loss"]["grad_norm"][""] == ([1.0], [0.5])
    assert c["loss"]["losses"][""] == ([1 / 3, 1.0, 2 + 1 / 2, 3.0], [0.01, 0.03, 0.01, 0.02])
    assert c["policy"]["clip_frac_high"][""] == ([0.5, 1.0, 2.5, 3.0], [0.0, 0.2, 0.0, 0.2])
    assert "skipped" not in {k for fig in c.values() for k in fig}


def test_phases_and_nested_eval_rows():
    rows = [{"phase": "rft", **rft_row(1)}, {"phase": "rft", **rft_row(2)},
            {"phase": "rl", "step": 1, "loss": 0.3}, {"phase": "eval", "step": 2,
                                                       "eval": {"pass@1": 0.4, "by_hops": {"1": 0.5, "2": 0.3}}}]
    c = curves(rows)
    assert c["loss"]["loss"] == {"rft": ([1.0, 2.0], [2.0, 1.0]), "rl": ([1.0], [0.3])}
    assert c["eval"]["eval/by_hops/2"] == {"eval": ([2.0], [0.3])}
    assert "phase" not in {k for fig in c.values() for k in fig}


def test_empty_and_bad_files(tmp_path):
    assert write_plots(write_jsonl(tmp_path / "empty.jsonl", []), tmp_path / "p") == []
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rft_row(1)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a JSON line"):
        write_plots(bad, tmp_path / "p")


def test_missing_matplotlib_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "HAS_MATPLOTLIB", False)
    with pytest.raises(ImportError, match="pip install matplotlib") as e:
        write_plots(write_jsonl(tmp_path / "m.jsonl", [rft_row(1)]), tmp_path / "p")
    assert isinstance(e.value, PlotsUnavailable) and "train.plots" in str(e.value)
    assert not (tmp_path / "p").exists()


def test_missing_tensorboard_names_the_field(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "HAS_TENSORBOARD", False)
    with pytest.raises(TensorBoardUnavailable, match=r"train\.tensorboard"):
        TensorBoardSink(tmp_path / "tb")
    assert issubclass(TensorBoardUnavailable, ImportError)
    assert not (tmp_path / "tb").exists()


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TensorBoardSink(tmp_path / "tb") as tb:
        tb.add(rl_row(1))
        tb.add(rl_row(2, skipped=True))
        tb.add({"phase": "rft", **rft_row(3)})
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert loss == [(1, pytest.approx(0.01))]  # the skipped step's null loss is not logged
    assert [(e.step, e.value) for e in acc.Scalars("clip_frac_high")] == [(1, pytest.approx(0.1))]  # list: mean
    assert [e.step for e in acc.Scalars("rft/tokens_per_s")] == [3]
    with pytest.raises(ValueError, match="step"):
        TensorBoardSink(tmp_path / "tb2").add({"loss": 1.0})
