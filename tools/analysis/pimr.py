"""``mimscale analyze pimr``: robustness to the mask ratio, PIMR and Global PIMR (seed 003, eq. 5–6).

    PIMR(M)        = (P(M) − P_min) / (P_max − P_min)      min, max over the model's own ratios
    Global PIMR(M) = (P(M) − P_Gmin) / (P_Gmax − P_Gmin)   min, max over every model compared

A model whose accuracy barely moves with the ratio has PIMR spread over [0, 1] anyway (it is
normalised by its own range); Global PIMR puts every model on one scale, so the robust model's
curve stays high. Undefined (NaN) when the range is zero.

Input: rows of (model, mask ratio, accuracy) from a CSV, a JSON file (a record or a list), or a
folder of them (e.g. what the downstream runs write); repeated (model, ratio) rows are averaged.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .output import AnalysisError, pyplot, save_figure, write_csv

MODEL_KEYS = ("model", "recipe", "checkpoint")
RATIO_KEYS = ("mask_ratio", "ratio", "masking.ratio")
VALUE_KEYS = ("accuracy", "acc", "top1", "value")


def pimr(performance: np.ndarray) -> np.ndarray:
    """Eq. 5 for one model: its performances over mask ratios -> PIMR per ratio."""
    p = np.asarray(performance, dtype=np.float64)
    return _normalise(p, p.min(), p.max())


def global_pimr(performance: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Eq. 6: every model's performances, normalised by the min and max over all models."""
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in performance.values()])
    lo, hi = values.min(), values.max()
    return {m: _normalise(np.asarray(v, dtype=np.float64), lo, hi) for m, v in performance.items()}


def _normalise(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi == lo:
        return np.full_like(p, np.nan)
    return (p - lo) / (hi - lo)


# ------------------------------------------------------------------------------------ reading


def _records(path: Path) -> list[tuple[str, dict]]:
    """(where, record) for every row of a CSV / JSON file, or of every such file in a folder."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".csv", ".json", ".jsonl"))
        if not files:
            raise AnalysisError(f"no .csv / .json / .jsonl files under {path}")
        return [r for f in files for r in _records(f)]
    if not path.is_file():
        raise FileNotFoundError(f"results table {path} does not exist")
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return [(f"{path}:{i + 2}", row) for i, row in enumerate(csv.DictReader(f))]
    if path.suffix == ".jsonl":
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        return [(f"{path}:{i + 1}", json.loads(ln)) for i, ln in enumerate(lines)]
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        data = data if isinstance(data, list) else [data]
        return [(f"{path}[{i}]", r) for i, r in enumerate(data) if isinstance(r, dict)]
    raise AnalysisError(f"{path}: expected a .csv, .json or .jsonl file (or a folder of them)")


def _pick(record: dict, explicit: str | None, candidates: tuple[str, ...]) -> str | None:
    keys = (explicit,) if explicit else candidates
    return next((k for k in keys if record.get(k) not in (None, "")), None)


def read_table(path: str | Path, model_key: str | None = None, ratio_key: str | None = None,
               value_key: str | None = None, benchmark: str | None = None) -> dict[str, dict[float, list[float]]]:
    """``{model: {mask ratio: [accuracies]}}``. Without explicit keys, the first present of
    MODEL_KEYS / RATIO_KEYS / VALUE_KEYS is used; in a folder, records lacking one are skipped."""
    path = Path(path)
    records = _records(path)
    table: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for where, rec in records:
        if benchmark is not None and rec.get("benchmark") != benchmark:
            continue
        keys = [_pick(rec, model_key, MODEL_KEYS), _pick(rec, ratio_key, RATIO_KEYS),
                _pick(rec, value_key, VALUE_KEYS)]
        if None in keys:
            if path.is_dir():
                continue
            names = ("model", "mask ratio", "accuracy")
            wanted = [f"{n} ({explicit or ' / '.join(c)})" for n, k, explicit, c in
                      zip(names, keys, (model_key, ratio_key, value_key), (MODEL_KEYS, RATIO_KEYS, VALUE_KEYS))
                      if k is None]
            raise AnalysisError(f"{where}: no {', '.join(wanted)} column; the row has "
                                f"{', '.join(rec)}; name columns with --model-key / --ratio-key / --value-key")
        try:
            ratio, value = float(rec[keys[1]]), float(str(rec[keys[2]]).rstrip("%"))
        except ValueError:
            raise AnalysisError(f"{where}: mask ratio {rec[keys[1]]!r} and accuracy {rec[keys[2]]!r} "
                                "must be numbers") from None
        table[str(rec[keys[0]])][ratio].append(value)
    if not table:
        raise AnalysisError(f"{path}: no (model, mask ratio, accuracy) rows"
                            + (f" for benchmark {benchmark!r}" if benchmark else ""))
    return {m: dict(sorted(v.items())) for m, v in table.items()}


# ------------------------------------------------------------------------------------ command


def run(path: str, out: Path, model_key=None, ratio_key=None, value_key=None, benchmark=None):
    table = read_table(path, model_key, ratio_key, value_key, benchmark)
    ratios = {m: np.array(list(v)) for m, v in table.items()}
    perf = {m: np.array([np.mean(a) for a in v.values()]) for m, v in table.items()}
    local = {m: pimr(p) for m, p in perf.items()}
    glob = global_pimr(perf)
    rows = [(m, float(r), float(perf[m][i]), len(table[m][r]), float(local[m][i]), float(glob[m][i]))
            for m in table for i, r in enumerate(ratios[m])]
    csv_path = write_csv(out / "pimr.csv", ("model", "mask_ratio", "accuracy", "runs", "pimr", "global_pimr"), rows)
    png = save_figure(_figure(ratios, perf, local, glob), out / "pimr.png")
    return csv_path, png, rows


def format_table(rows) -> str:
    lines = ["| model | mask ratio | accuracy | runs | PIMR | Global PIMR |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {m} | {r:.2f} | {a:.4g} | {n} | {p:.3f} | {g:.3f} |" for m, r, a, n, p, g in rows]
    return "\n".join(lines)


def _figure(ratios, perf, local, glob):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for m in ratios:
        for ax, values in zip(axes, (perf[m], local[m], glob[m])):
            ax.plot(ratios[m], values, marker="o", label=m)
    for ax, title in zip(axes, ("accuracy", "PIMR (eq. 5)", "Global PIMR (eq. 6)")):
        ax.set_xlabel("mask ratio")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1:]:
        ax.set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
