"""Helpers the shard writers share: the write order, atomic files, a progress bar, a worker pool."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..plan import mix_seed

_WRITE_ORDER = 4  # domain tag for mix_seed


def write_order(n: int, shuffle: bool, seed: int) -> np.ndarray:
    """Input indices in the order they are written. Shuffled by default: an ImageFolder is sorted
    by class, and a shard read in order would otherwise hold one class per batch."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng(mix_seed(_WRITE_ORDER, seed)).permutation(n)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, doc: dict) -> None:
    atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode())


@contextmanager
def progress_bar(total: int, done: int, label: str, enabled: bool = True):
    """Yields ``advance(n)``; a rich bar when ``enabled`` (and quiet otherwise)."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), transient=not sys.stderr.isatty()) as bar:
        task = bar.add_task(label, total=total, completed=done)
        yield lambda n=1: bar.advance(task, n)


_JOB = None


def _init(job) -> None:
    global _JOB
    _JOB = job


def _call(i):
    return _JOB(i)


def parallel_map(job: Callable, indices: Iterable[int], workers: int) -> Iterator:
    """``job(i)`` for each index, in order, in ``workers`` processes (in this one when 0)."""
    if workers <= 0:
        yield from map(job, indices)
        return
    with multiprocessing.get_context("fork").Pool(workers, _init, (job,)) as pool:
        yield from pool.imap(_call, indices, chunksize=8)
