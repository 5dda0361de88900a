"""Atomic checkpoints: a checkpoint is complete or absent, never half-written.

Layout of ``<run>/checkpoints/``::

    step_00001000/            a complete checkpoint (renamed into place as the last act)
        state.pt              model, optimizer, schedule position, data position, RNG states, ...
        config.yaml           the resolved config of the run that wrote it
        COMPLETE              marker written after everything else
    .tmp-step_00002000-<pid>  a save in progress, or one a crash interrupted: ignored and cleaned

A save writes everything into a temporary folder, flushes it to disk, writes the marker and renames
the folder to its final name; a crash at any point leaves the previous checkpoints untouched. The
folder form (rather than one file) lets sharded backends write one file per rank later.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

MARKER = "COMPLETE"
STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def is_complete(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / MARKER).is_file() and (path / STATE_FILE).is_file()


class CheckpointManager:
    """Saves, lists, prunes and finds checkpoints under one folder."""

    def __init__(self, folder: str | Path, keep_last: int | None = None):
        self.folder = Path(folder)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}"

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = []
        for p in self.folder.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and is_complete(p):
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def save(self, step: int, state: dict[str, Any], config_yaml: str = "") -> Path:
        """Write ``state`` atomically as the checkpoint of ``step`` and prune old ones."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._clean_partial()
        tmp = self.folder / f".tmp-step_{step:08d}-{os.getpid()}"
        tmp.mkdir()
        _write_file(tmp / STATE_FILE, lambda f: torch.save(state, f))
        _write_file(tmp / "config.yaml", lambda f: f.write(config_yaml.encode()))
        _write_file(tmp / MARKER, lambda f: f.write(f"step {step}\n".encode()))
        _fsync_dir(tmp)
        final = self.path_for(step)
        if final.exists():  # re-saving a step (e.g. after a resume): swap, never leave a gap
            trash = self.folder / f".old-{final.name}-{os.getpid()}"
            final.rename(trash)
            tmp.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(self.folder)
        self._prune()
        return final

    def _clean_partial(self) -> None:
        for p in self.folder.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        done = self.complete()
        for _, path in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a complete checkpoint folder (or its ``state.pt``); say clearly what is wrong if not."""
    path = Path(path)
    folder = path.parent if path.name == STATE_FILE else path
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint {folder} does not exist")
    if not is_complete(folder):
        raise FileNotFoundError(
            f"checkpoint {folder} is incomplete (no {MARKER} marker or no {STATE_FILE}): "
            "it was interrupted while being written; use an earlier one or resume=auto")
    return torch.load(folder / STATE_FILE, map_location=map_location, weights_only=True)


def resolve_resume(resume: str, manager: CheckpointManager) -> Path | None:
    """``none`` -> None; ``auto`` -> newest complete checkpoint (or None); else the given path."""
    if resume in ("none", ""):
        return None
    if resume == "auto":
        return manager.latest()
    path = Path(resume)
    if not is_complete(path if path.name != STATE_FILE else path.parent):
        load_checkpoint(path)  # raises with the reason
    return path
