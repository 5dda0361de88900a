"""Rank-0 run logging: JSONL metrics, TensorBoard scalars, and a progress bar on a terminal."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class RunLogger:
    """Writes one JSON line per logged step to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    Only the main rank writes; other ranks get a logger whose methods do nothing, so callers never
    branch on the rank.
    """

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: str = "auto"):
        self.enabled = enabled
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.tb_dir = Path(run_dir) / "tensorboard"
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.metrics_path, "a")  # noqa: SIM115 (open for the whole run)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.tb_dir), purge_step=start_step or None)
        show = progress == "on" or (progress == "auto" and sys.stdout.isatty())
        if show:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self._bar.start()
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, info="")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, step)
        line = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()
                        if k in _SHOWN and v is not None and (v or k not in _SHOWN_IF_ANY))
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=line)
        else:
            print(f"step {step}: {line}", flush=True)

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def print(self, *args) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(*args)
        else:
            print(*args, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.stop()
        if self._tb is not None:
            self._tb.close()
        self._file.close()


_SHOWN = ("epoch", "loss", "lr", "images_per_s", "tflops_per_s", "mfu", "bad_samples")
_SHOWN_IF_ANY = ("bad_samples",)  # on the line once there are some: a clean run's line stays short


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
