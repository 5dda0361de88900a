"""The study's report: per-run values read back from the runs' own result files, then mean ± sample
standard deviation over seeds per row and the paired difference to the baseline row (per seed,
then mean ± std of those differences), as Markdown, CSV and one bar chart per metric."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from mimscale.downstream.results import read_results

from . import Study
from .plan import RUN_MARKER, Step, read_json

ACCURACY = {"knn_cls": "kNN top-1, CLS token", "knn_mean": "kNN top-1, mean patch token",
            "linprobe_cls": "linear probe top-1, CLS token", "linprobe_mean": "linear probe top-1, mean patch token"}
MASKS = {"object_hidden": "object patches hidden", "background_hidden": "background patches hidden",
         "object_lift": "object hidden / random's"}
COST = {"images_seen": "images seen", "wall_s": "wall time (s)", "flops": "counted FLOPs"}


def run_values(steps: list[Step]) -> dict[tuple[str, int], dict[str, float]]:
    """``{(row, seed): {metric: value}}`` from each step's own output files."""
    out: dict[tuple[str, int], dict[str, float]] = {}
    for step in steps:
        if not step.done():
            continue
        values = out.setdefault((step.row, step.seed), {})
        if step.kind == "pretrain":
            record = read_json(step.out / RUN_MARKER) or {}
            values.update({k: float(record[k]) for k in COST if k in record})
        elif step.kind == "masks":
            with open(step.out / "masks.csv", newline="") as f:
                first = next(csv.DictReader(f))
            values.update({k: float(first[k]) for k in MASKS})
        else:
            records = [r for r in read_results(step.out) if r.get("protocol") == step.kind]
            if records:
                newest = max(records, key=lambda r: r.get("time", ""))
                values[step.name.split("/")[0]] = float(newest["value"])
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarize(study: Study, runs: dict[tuple[str, int], dict[str, float]]) -> list[dict]:
    """One row per (study row, metric): n, mean, std, and the paired difference to the baseline."""
    rows = []
    for row in study.rows:
        for metric in (*ACCURACY, *MASKS, *COST):
            per_seed = {s: runs[(row, s)][metric] for s in study.seeds if metric in runs.get((row, s), {})}
            if not per_seed:
                continue
            mean, std = _mean_std(list(per_seed.values()))
            base = {s: runs[(study.baseline, s)][metric] for s in per_seed
                    if metric in runs.get((study.baseline, s), {})}
            diffs = [per_seed[s] - base[s] for s in base]
            d_mean, d_std = _mean_std(diffs) if row != study.baseline else (math.nan, math.nan)
            rows.append({"row": row, "metric": metric, "n": len(per_seed), "mean": mean, "std": std,
                         "diff_n": len(diffs) if row != study.baseline else 0, "diff_mean": d_mean, "diff_std": d_std})
    return rows


def _cell(mean: float, std: float, digits: int = 1, sign: bool = False) -> str:
    if math.isnan(mean):
        return "—"
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text if math.isnan(std) else f"{text} ± {std:.{digits}f}"


def _scaled(metric: str, mean: float, std: float) -> str:
    if metric == "flops":
        return _cell(mean / 1e12, std / 1e12, 2)
    if metric == "images_seen":
        return _cell(mean, std, 0)
    if metric in MASKS:
        return _cell(mean, std, 3)
    return _cell(mean, std, 1)


def markdown(study: Study, summary: list[dict], done: int, total: int) -> str:
    cells = {(r["row"], r["metric"]): r for r in summary}
    shown = [m for m in (*ACCURACY, *MASKS) if any(k[1] == m for k in cells)]
    costs = [m for m in COST if any(k[1] == m for k in cells)]
    head = {"flops": "TFLOPs", **{k: v for k, v in {**ACCURACY, **MASKS, **COST}.items() if k != "flops"}}
    budget = study.budget
    amount = f"{budget['steps']} optimizer steps" if budget["by"] == "steps" else f"{budget['seconds']} s of training"
    lines = [f"# Study {Path(study.file).stem}", "",
             f"{len(study.recipes)} recipes x {len(study.seeds)} seeds (seeds {', '.join(map(str, study.seeds))}); "
             f"budget: {amount} at batch {budget['batch']} per rank; model {study.model}; data "
             f"{study.data['dataset']}. Cells: mean ± sample std over seeds. {done} of {total} steps done.", "",
             "| row | seeds | " + " | ".join(head[m] for m in shown + costs) + " |",
             "|---|---:|" + "---:|" * len(shown + costs)]
    for row in study.rows:
        counts = sorted({cells[(row, m)]["n"] for m in shown + costs if (row, m) in cells}) or [0]
        n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"  # a study still running
        values = [_scaled(m, cells[(row, m)]["mean"], cells[(row, m)]["std"]) if (row, m) in cells else "—"
                  for m in shown + costs]
        lines.append(f"| {row} | {n} | " + " | ".join(values) + " |")
    lines += ["", f"Paired difference to `{study.baseline}` (same seed; mean ± std of the per-seed differences):", "",
              "| row | pairs | " + " | ".join(head[m] for m in shown) + " |", "|---|---:|" + "---:|" * len(shown)]
    for row in study.rows:
        if row == study.baseline:
            continue
        pairs = max((cells[(row, m)]["diff_n"] for m in shown if (row, m) in cells), default=0)
        values = [_cell(cells[(row, m)]["diff_mean"], cells[(row, m)]["diff_std"], 3 if m in MASKS else 1, True)
                  if (row, m) in cells else "—" for m in shown]
        lines.append(f"| {row} | {pairs} | " + " | ".join(values) + " |")
    return "\n".join(lines + ["", *_reading(study, cells, shown)]) + "\n"


def _reading(study: Study, cells: dict, shown: list[str]) -> list[str]:
    """Per metric, which rows differ from the baseline by more than the spread of their paired
    differences over seeds (|mean| > std, at least two pairs); the others are within it."""
    lines = ["Beyond the seed spread (|paired mean| > its std, >= 2 seeds); every other difference is within it:", ""]
    for m in shown:
        rows = [f"{r} ({cells[(r, m)]['diff_mean']:+.3g})" for r in study.rows
                if r != study.baseline and (r, m) in cells and cells[(r, m)]["diff_n"] >= 2
                and abs(cells[(r, m)]["diff_mean"]) > cells[(r, m)]["diff_std"]]
        lines.append(f"- {({**ACCURACY, **MASKS})[m]}: {', '.join(rows) if rows else 'none'}")
    return lines


def to_csv(summary: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    keys = ["row", "metric", "n", "mean", "std", "diff_n", "diff_mean", "diff_std"]
    writer.writerow(keys)
    for r in summary:
        writer.writerow([f"{r[k]:.6g}" if isinstance(r[k], float) else r[k] for k in keys])
    return buf.getvalue()


def runs_csv(study: Study, runs: dict[tuple[str, int], dict[str, float]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    metrics = [*ACCURACY, *MASKS, *COST]
    writer.writerow(["row", "seed", *metrics])
    for row in study.rows:
        for seed in study.seeds:
            values = runs.get((row, seed), {})
            writer.writerow([row, seed, *(f"{values[m]:.6g}" if m in values else "" for m in metrics)])
    return buf.getvalue()


def figure(study: Study, metric: str, summary: list[dict], runs: dict, path: Path) -> Path:
    from mimscale.tools.analysis.output import pyplot, save_figure

    plt = pyplot()
    rows = [r for r in summary if r["metric"] == metric]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.75 * len(rows) + 1.5), 3.4))
    xs = range(len(rows))
    colors = ["#7f8c8d" if r["row"] == "untrained" else "#2c7fb8" if r["row"] == study.baseline else "#41ab5d"
              for r in rows]
    ax.bar(xs, [r["mean"] for r in rows], 0.65, color=colors,
           yerr=[0 if math.isnan(r["std"]) else r["std"] for r in rows], capsize=4, error_kw={"lw": 1})
    for x, r in zip(xs, rows):
        seeds = [runs[(r["row"], s)][metric] for s in study.seeds if metric in runs.get((r["row"], s), {})]
        ax.scatter([x] * len(seeds), seeds, s=9, color="black", zorder=3)
    ax.set_xticks(list(xs), [r["row"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel({**ACCURACY, **MASKS, **COST}[metric], fontsize=8)
    ax.set_title(f"{Path(study.file).stem}: mean ± std over {len(study.seeds)} seeds (dots: runs)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(study: Study, steps: list[Step]) -> tuple[str, list[Path]]:
    """Write study.md, study.csv, runs.csv and figures/<metric>.png into the study folder."""
    runs = run_values(steps)
    summary = summarize(study, runs)
    done = sum(s.done() for s in steps)
    text = markdown(study, summary, done, len(steps))
    study.out.mkdir(parents=True, exist_ok=True)
    paths = [study.out / "study.md", study.out / "study.csv", study.out / "runs.csv"]
    paths[0].write_text(text)
    paths[1].write_text(to_csv(summary))
    paths[2].write_text(runs_csv(study, runs))
    for metric in dict.fromkeys(r["metric"] for r in summary):
        if metric in ACCURACY or metric in ("object_hidden", "object_lift"):
            paths.append(figure(study, metric, summary, runs, study.out / "figures" / f"{metric}.png"))
    return text, paths
