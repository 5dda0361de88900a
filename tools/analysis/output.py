"""Where analyses put their results: CSV tables, PNG figures, and a progress bar on a terminal."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from mimscale.errors import UserError


class AnalysisError(UserError, ValueError):
    """Input an analysis cannot use; the message says what is wrong and what would work."""


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    return path


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display needed, safe on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 130) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path


def progress(items: Iterable, total: int, description: str) -> Iterable:
    """``items`` with a rich progress bar when stdout is a terminal, unchanged otherwise."""
    if not sys.stdout.isatty():
        return items
    from rich.progress import track

    return track(items, description=description, total=total)
