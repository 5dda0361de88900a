"""One JSON per benchmark result, and the table of all of them.

Every downstream run writes ``<run>/results/<benchmark>.json``::

    {"mimscale_result": 1, "benchmark": "imagenet/finetune", "metric": "top1", "value": 83.4,
     "checkpoint": "vitb_gpa@200000", "recipe": "gpa", "epochs": 100, "config_hash": "3f2a...",
     "metrics": {"top1": 83.4, "top5": 96.5, "n": 50000}, "mask_ratio": 0.75, ...}

``mask_ratio`` (the checkpoint's pretraining masking ratio) is present only when the checkpoint
records one; records written before it existed read the same.

``mimscale results FOLDER`` finds every such file below FOLDER and writes one table — rows are
checkpoints (or pretraining recipes), columns benchmarks — as Markdown (printed, and
``results.md``) and CSV (``results.csv``). When a cell has several results the newest wins.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from mimscale.errors import UserError

SCHEMA = 1
RESULTS_DIR = "results"


def write_result(run_dir: str | os.PathLike, benchmark: str, metric: str, value: float, *,
                 checkpoint: str, recipe: str | None, epochs: float | None, config_hash: str,
                 metrics: dict | None = None, mask_ratio: float | None = None, **extra) -> Path:
    """Write one result atomically; the file name is the benchmark's. ``mask_ratio`` is recorded
    only when known."""
    record = {"mimscale_result": SCHEMA, "benchmark": benchmark, "metric": metric, "value": float(value),
              "checkpoint": checkpoint, "recipe": recipe, "epochs": epochs, "config_hash": config_hash,
              "metrics": metrics or {metric: float(value)}}
    if mask_ratio is not None:
        record["mask_ratio"] = float(mask_ratio)
    record.update(time=time.strftime("%Y-%m-%dT%H:%M:%S"), run_dir=os.fspath(run_dir), **extra)
    folder = Path(run_dir) / RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{re.sub(r'[^A-Za-z0-9_.%@+-]+', '_', benchmark)}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_results(folder: str | os.PathLike) -> list[dict]:
    """Every result record below ``folder`` (other JSON files are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"results folder {folder} does not exist")
    out = []
    for path in sorted(folder.rglob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("mimscale_result") == SCHEMA:
            record["_path"] = str(path)
            out.append(record)
    return out


@dataclass
class Table:
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], float]
    row_label: str
    metric: str

    def value(self, row: str, column: str) -> float | None:
        return self.cells.get((row, column))


def build_table(records: list[dict], rows: str = "checkpoint", metric: str | None = None) -> Table:
    """Rows = ``checkpoint`` or ``recipe``; a cell is the record's ``metric`` (default: each record's
    own headline metric), the newest record winning."""
    if rows not in ("checkpoint", "recipe"):
        raise ValueError(f"rows {rows!r} is not valid; valid: checkpoint, recipe")
    newest: dict[tuple[str, str], tuple[str, float]] = {}
    for r in records:
        name = metric or r["metric"]
        value = r.get("metrics", {}).get(name, r["value"] if name == r["metric"] else None)
        if value is None:
            continue
        column = r["benchmark"] if metric or name == "top1" else f"{r['benchmark']} ({name})"
        key = (str(r.get(rows) or "unknown"), column)
        if key not in newest or r.get("time", "") >= newest[key][0]:
            newest[key] = (r.get("time", ""), float(value))
    cells = {k: v for k, (_, v) in newest.items()}
    row_names = sorted({r for r, _ in cells})
    columns = sorted({c for _, c in cells}, key=_column_order)
    return Table(row_names, columns, cells, rows, metric or "top1")


def _column_order(column: str) -> tuple:
    order = {"finetune": 0, "linprobe": 1, "knn": 2}
    dataset, _, rest = column.partition("/")
    protocol = rest.split("+")[0].split(" ")[0]
    return (order.get(protocol, 9), dataset, rest)


def _fmt(v: float | None, digits: int = 2) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def to_markdown(table: Table) -> str:
    head = [table.row_label] + table.columns
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(table.columns)) + "|"]
    for r in table.rows:
        lines.append("| " + " | ".join([r] + [_fmt(table.value(r, c)) for c in table.columns]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([table.row_label] + table.columns)
    for r in table.rows:
        writer.writerow([r] + [_fmt(table.value(r, c), 6) for c in table.columns])
    return buf.getvalue()


def collect(folder: str | os.PathLike, rows: str = "checkpoint", metric: str | None = None,
            out: str | os.PathLike | None = None) -> tuple[Table, Path, Path]:
    """Read every result below ``folder`` and write ``results.md`` / ``results.csv`` into ``out``
    (default: ``folder``)."""
    records = read_results(folder)
    if not records:
        raise FileNotFoundError(f"no result JSONs below {folder} (runs write them to <run>/{RESULTS_DIR}/)")
    table = build_table(records, rows, metric)
    if not table.cells:
        raise UserError(f"--metric: none of the {len(records)} results below {folder} has metric {metric!r}")
    out = Path(out or folder)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / "results.md", out / "results.csv"
    md.write_text(to_markdown(table))
    csv_path.write_text(to_csv(table))
    return table, md, csv_path


def _cmd_results(args) -> int:
    table, md, csv_path = collect(args.folder, args.rows, args.metric, args.out)
    print(to_markdown(table), end="")
    print(f"\n{len(table.rows)} row(s) x {len(table.columns)} benchmark(s); written to {md} and {csv_path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("results", help="collect the result JSONs below a folder into one Markdown/CSV table",
                       description="Find every <run>/results/*.json below FOLDER (written by finetune, "
                                   "linprobe, knn, ...) and print one table: rows = checkpoints (or "
                                   "pretraining recipes), columns = benchmarks. Also writes results.md "
                                   "and results.csv.")
    p.add_argument("folder", help="folder searched recursively for result JSONs")
    p.add_argument("--rows", choices=("checkpoint", "recipe"), default="checkpoint",
                   help="what a row is (default: checkpoint)")
    p.add_argument("--metric", default=None, help="metric shown, e.g. top5 (default: each result's headline, top1)")
    p.add_argument("--out", default=None, help="folder for results.md / results.csv (default: FOLDER)")
    p.set_defaults(func=_cmd_results)
