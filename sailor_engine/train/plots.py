"""The trainer's metric curves outside metrics.jsonl: PNG plots at the end, TensorBoard scalars as they come.

    paths = write_plots(out_dir / "metrics.jsonl", out_dir / "plots")   # one PNG per group of curves
    with TensorBoardSink(out_dir / "tb") as tb:                          # train.tensorboard
        tb.add(row)                                                      # each metrics row as written

Both read rows as the loops write them and assume no schema beyond `step`: RFT rows (loss, lr,
grad_norm, tokens_per_s, ...), RL rows (reward_mean, accuracy, clip_frac_low as a list with one
entry per mini-batch update, dupo_* counts, time_rollout, ...), rows tagged with a `phase`, eval
rows with nested dicts. A key is plotted when its value is a number, a list of numbers or a dict
of them (flattened to `key/sub`); strings, booleans and nulls are skipped, and so are non-finite
values (a skipped step logs loss null; a NaN must not blank a whole axis). So a metric added to
a loop later shows up without touching this file: keys are sorted into a few figures by name
(`FIGURES`), anything unmatched lands in `other.png`.

A list value at step s with n entries is drawn at x = s - 1 + (i + 1) / n: the updates of one RL
step spread over the step, the last one at s. Rows with different `phase` values draw one line
per phase on each axis.

matplotlib and tensorboard are optional: detected here once (HAS_MATPLOTLIB, HAS_TENSORBOARD; tests
flip them to check the errors) and imported only when used. Missing, they raise an ImportError
whose message says what to install or which config field to turn off; the trainer decides
whether that is a warning (plots at the end) or an error (TensorBoard asked for).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None

# (figure name, key pattern), first match wins; matched against the flattened key.
FIGURES: tuple[tuple[str, str], ...] = (
    ("eval", r"^eval"),
    ("throughput", r"tokens_per_s$|_per_s$"),
    ("time", r"^time_"),
    ("dupo", r"^dupo_"),
    ("reward", r"^(reward|accuracy|format_ok|pass@)"),
    ("policy", r"clip_frac|ratio_|logp_mismatch|^kl|entropy"),
    ("episodes", r"^(turns|tool_|response_|format_errors$|episodes$|answered$|max_turns$|max_context$)"),
    ("loss", r"^(loss|losses|grad_norms?|lr)$"),
    ("tokens", r"tokens$"),
)
_X_KEYS = ("step",)  # the x axis, never a curve
_COLS = 3


class PlotsUnavailable(ImportError):
    """matplotlib is not installed."""


class TensorBoardUnavailable(ImportError):
    """train.tensorboard is on but the tensorboard package is not installed."""


# -- reading ---------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (blank lines skipped); a bad line raises ValueError naming it."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON line ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def numeric_items(row: dict, prefix: str = "") -> Iterator[tuple[str, list[float]]]:
    """(flattened key, finite values) for every plottable entry of a row; a scalar gives one value.

    A list keeps its length with NaN where an entry is not a finite number (the x positions of the
    others must not shift); a list without any finite entry, like a null, yields nothing.
    """
    for k, v in row.items():
        key = f"{prefix}{k}"
        if key in _X_KEYS or k == "phase":
            continue
        if isinstance(v, dict):
            yield from numeric_items(v, f"{key}/")
        elif isinstance(v, list):
            vals = [float(x) if _finite(x) else math.nan for x in v]
            if any(not math.isnan(x) for x in vals):
                yield key, vals
        elif _finite(v):
            yield key, [float(v)]


def figure_of(key: str) -> str:
    """The figure a flattened key is drawn in (FIGURES, else 'other')."""
    return next((name for name, rx in FIGURES if re.search(rx, key)), "other")


def curves(rows: list[dict]) -> dict[str, dict[str, dict[str, tuple[list[float], list[float]]]]]:
    """figure -> key -> phase -> (xs, ys), finite points only; rows without a numeric step are skipped."""
    out: dict = {}
    for row in rows:
        step = row.get("step")
        if not _finite(step):
            continue
        phase = str(row.get("phase") or "")
        for key, vals in numeric_items(row):
            xs, ys = out.setdefault(figure_of(key), {}).setdefault(key, {}).setdefault(phase, ([], []))
            n = len(vals)
            for i, y in enumerate(vals):
                if not math.isnan(y):
                    xs.append(step - 1 + (i + 1) / n if n > 1 else float(step))
                    ys.append(y)
    return out


# -- PNG plots -------------------------------------------------------------------------------------


def _matplotlib():
    if not HAS_MATPLOTLIB:
        raise PlotsUnavailable("PNG plots of the metrics need matplotlib: pip install matplotlib "
                               "(or set train.plots=false)")
    # The object API with an explicit Agg canvas: no pyplot global state, no display backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def write_plots(metrics_jsonl: Path, out_dir: Path) -> list[Path]:
    """One PNG per figure with any finite point (out_dir/<figure>.png), one axis per metric; the paths written.

    Raises PlotsUnavailable without matplotlib, FileNotFoundError without the metrics file. A file
    with no plottable value writes nothing and returns [].
    """
    Figure, Canvas = _matplotlib()
    groups = curves(read_metrics(metrics_jsonl))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in sorted(groups):
        keys = sorted(groups[name])
        rows = math.ceil(len(keys) / _COLS)
        cols = min(_COLS, len(keys))
        fig = Figure(figsize=(4.2 * cols, 2.9 * rows), layout="constrained")
        Canvas(fig)
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax, key in zip(axes, keys):
            for phase, (xs, ys) in sorted(groups[name][key].items()):
                ax.plot(xs, ys, marker="." if len(xs) < 40 else None, linewidth=1.2, label=phase or None)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if len(groups[name][key]) > 1:
                ax.legend(fontsize=7)
        for ax in axes[len(keys):]:
            ax.set_visible(False)
        fig.suptitle(f"{name}  ({Path(metrics_jsonl).name})", fontsize=10)
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


# -- TensorBoard -----------------------------------------------------------------------------------


class TensorBoardSink:
    """Scalars of each metrics row to TensorBoard event files in log_dir (torch.utils.tensorboard).

    Tags are the flattened keys, `phase/key` when the row has a phase; a list (per-update values)
    is logged as its mean at the row's step. Constructing it without the tensorboard package raises
    TensorBoardUnavailable naming train.tensorboard, so a run that asked for it fails before training.
    """

    def __init__(self, log_dir: str | Path):
        if not HAS_TENSORBOARD:
            raise TensorBoardUnavailable("train.tensorboard = true needs the tensorboard package: "
                                         "pip install tensorboard, or set train.tensorboard=false")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def add(self, row: dict) -> None:
        step = row.get("step")
        if not _finite(step):
            raise ValueError(f"TensorBoardSink.add: the row needs a numeric 'step', got {step!r}")
        phase = row.get("phase")
        for key, vals in numeric_items(row):
            kept = [v for v in vals if not math.isnan(v)]
            self.writer.add_scalar(f"{phase}/{key}" if phase else key, sum(kept) / len(kept), int(step))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "TensorBoardSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
