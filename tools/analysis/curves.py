"""``mimscale plot RUN…``: training curves from the runs' ``metrics.jsonl``, runs overlaid.

Every numeric key a run logged is drawn; keys that belong together share a panel (every loss term,
the per-shot losses, PLB's head distribution, mask ratios and schedules, ...). Keys the table below
does not know are grouped by name without a trailing index (``foo_0``, ``foo_1`` -> ``foo``), so
new metrics show up without a code change.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from mimscale.pretrain.engine.logger import read_metrics

from .output import AnalysisError, pyplot, save_figure, write_csv

NOT_METRICS = {"step", "time", "epoch"}
PANELS: tuple[tuple[str, str], ...] = (  # (title, key pattern); the first match wins
    ("per-shot losses", r"^loss_shot\d+$"),
    ("loss terms", r"^loss($|_)"),
    ("PLB head distribution (updated each epoch)", r"^plb_p_\d+$"),
    ("PLB per-head losses", r"^plb_(loss|head_loss)_\d+$"),
    ("mask ratios and schedules", r"(^|_)ratio($|_)|^gpa_alpha_|_fallback$"),
    ("salience entropy (nats)", r"^salience_entropy$"),
    ("learning rate", r"^lr$"),
    ("throughput (images/s)", r"^images_per_s$"),
    ("mask time (ms)", r"^mask_time_ms$"),
    ("wait for data per step (ms)", r"^data_wait_ms$"),
    ("gradient norm", r"^grad_norm$"),
)
X_AXES = ("step", "time")


@dataclass
class Run:
    label: str
    records: list[dict]

    def metrics(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.records:
            for k, v in r.items():
                if k not in NOT_METRICS and _number(v) is not None:
                    seen[k] = None
        return list(seen)

    def series(self, key: str, x_axis: str) -> tuple[list[float], list[float]]:
        t0 = self.records[0].get("time", 0.0) if self.records else 0.0
        xs, ys = [], []
        for r in self.records:
            y = _number(r.get(key))
            if y is None:
                continue
            xs.append(r["step"] if x_axis == "step" else r.get("time", math.nan) - t0)
            ys.append(y)
        return xs, ys


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def panel_of(key: str) -> str:
    for title, pattern in PANELS:
        if re.search(pattern, key):
            return title
    return re.sub(r"_?\d+$", "", key) or key


def load_runs(paths: list[str]) -> list[Run]:
    runs = []
    for p in map(Path, paths):
        file = p / "metrics.jsonl" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"no metrics.jsonl in {p} (give a run folder or a metrics.jsonl file)")
        records = [r for r in read_metrics(file) if isinstance(r.get("step"), int)]
        if not records:
            raise AnalysisError(f"{file} has no logged steps")
        runs.append(Run((p if p.is_dir() else p.parent).name or str(p), records))
    labels = [r.label for r in runs]
    for r, p in zip(runs, map(Path, paths)):  # same folder names under different parents
        if labels.count(r.label) > 1:
            folder = p if p.is_dir() else p.parent
            r.label = f"{folder.parent.name}/{folder.name}"
    return runs


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard-style exponential moving average, debiased at the start."""
    if weight <= 0:
        return values
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** (i + 1)))
    return out


def run(paths: list[str], out: Path, x_axis: str = "step", smoothing: float = 0.0) -> tuple[Path, Path, list[str]]:
    if x_axis not in X_AXES:
        raise AnalysisError(f"--x {x_axis!r}: valid: {', '.join(X_AXES)}")
    if not 0 <= smoothing < 1:
        raise AnalysisError(f"--smooth {smoothing}: must be in [0, 1)")
    runs = load_runs(paths)
    panels: dict[str, list[str]] = {}
    for r in runs:
        for k in r.metrics():
            keys = panels.setdefault(panel_of(k), [])
            if k not in keys:
                keys.append(k)
    order = [t for t, _ in PANELS if t in panels] + [t for t in panels if t not in dict(PANELS)]
    rows = [(r.label, r.records[i]["step"], k, v) for r in runs for k in r.metrics()
            for i, v in _indexed(r, k)]
    csv = write_csv(out / "curves.csv", ("run", "step", "metric", "value"), rows)
    png = save_figure(_figure(runs, [(t, panels[t]) for t in order], x_axis, smoothing), out / "curves.png")
    return csv, png, order


def _indexed(run: Run, key: str):
    for i, r in enumerate(run.records):
        v = _number(r.get(key))
        if v is not None:
            yield i, v


def _figure(runs: list[Run], panels: list[tuple[str, list[str]]], x_axis: str, smoothing: float):
    plt = pyplot()
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.2 * nrows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        present = [r for r in runs if set(keys) & set(r.metrics())]
        distribution = title.startswith("PLB head distribution") and len(present) == 1
        if not (distribution and _stacked(ax, present[0], keys, x_axis)):
            _lines(ax, runs, keys, x_axis, smoothing)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step" if x_axis == "step" else "seconds since the first record")
        ax.grid(alpha=0.3)
        entries = len(ax.get_legend_handles_labels()[0])
        if 1 < entries <= 12 or (entries == 1 and len(runs) > 1):  # always say which run a line is
            ax.legend(fontsize=7, title=present[0].label if distribution and len(runs) > 1 else None,
                      title_fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _colour(j: int, n: int):
    """Distinct colours for up to 10 series, a continuous map beyond (e.g. 16 PLB heads)."""
    plt = pyplot()
    return plt.get_cmap("tab10")(j % 10) if n <= 10 else plt.get_cmap("viridis")(j / (n - 1))


def _lines(ax, runs: list[Run], keys: list[str], x_axis: str, smoothing: float) -> None:
    """One key: a colour per run. Several keys: a colour per key and a line style per run."""
    styles = ("-", "--", ":", "-.")
    for i, r in enumerate(runs):
        for j, k in enumerate(keys):
            xs, ys = r.series(k, x_axis)
            if not xs:
                continue
            if len(keys) == 1:
                colour, style, name = _colour(i, len(runs)), "-", r.label
            else:
                colour, style = _colour(j, len(keys)), styles[i % len(styles)]
                name = f"{k} · {r.label}" if len(runs) > 1 else k
            ax.plot(xs, smooth(ys, smoothing), style, color=colour, lw=1.2, label=name)


def _stacked(ax, run: Run, keys: list[str], x_axis: str) -> bool:
    """One run's distribution over heads as stacked areas (they sum to 1 at every step); False if
    the heads were not logged at the same steps."""
    series = [run.series(k, x_axis) for k in keys]
    xs = series[0][0]
    if not xs or any(s[0] != xs for s in series):
        return False
    ax.stackplot(xs, *[s[1] for s in series], labels=keys, colors=[_colour(j, len(keys)) for j in range(len(keys))])
    ax.set_ylim(0, 1)
    return True
