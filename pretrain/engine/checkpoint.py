"""Atomic checkpoints: a checkpoint is complete or absent, never half-written.

Layout of ``<run>/checkpoints/``::

    step_00001000/            a complete checkpoint (renamed into place as the last act)
        state.pt              step, data position, RNG states of every rank, config, ...; with the
                              ``full`` format also the model (official MAE layout) and optimizer
        dcp/                  ``dcp`` format (fsdp): model + optimizer as torch.distributed.checkpoint
                              shards, loadable on any number of ranks
        deepspeed/            ``deepspeed`` format: DeepSpeed's own per-rank files
        config.yaml           the resolved config of the run that wrote it
        COMPLETE              marker written after everything else
    .tmp-step_00002000        a save in progress, or one a crash interrupted: ignored and cleaned

A save stages everything in the temporary folder (every rank writes its shards there), flushes it
to disk, writes the marker and renames the folder to its final name; a crash or SIGKILL at any point
leaves the previous checkpoints untouched. ``load_checkpoint`` returns the same consolidated dict
whatever the format, so tools never care which backend wrote a checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mimscale.errors import CheckpointError

from .safe_load import load_file

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


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder below ``folder`` (shards written by other ranks included)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in dirs:
            _fsync_dir(Path(root) / name)


def _finalize(tmp: Path, final: Path, state: dict[str, Any], config_yaml: str, note: str) -> Path:
    """state.pt and config into ``tmp``, flush everything, marker last, rename to ``final``."""
    _write_file(tmp / STATE_FILE, lambda f: torch.save(state, f))
    _write_file(tmp / "config.yaml", lambda f: f.write(config_yaml.encode()))
    _fsync_tree(tmp)
    _write_file(tmp / MARKER, lambda f: f.write(f"{note}\n".encode()))
    _fsync_dir(tmp)
    if final.exists():  # re-saving (e.g. a step after a resume): swap, never leave a gap
        trash = final.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)
    return final


def write_checkpoint(folder: str | Path, state: dict[str, Any], config_yaml: str = "") -> Path:
    """Write a complete checkpoint folder at any path, atomically (one writer)."""
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return _finalize(tmp, final, state, config_yaml, f"step {state.get('step', '?')}")


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

    def staging_path(self, step: int) -> Path:
        """Where the save of ``step`` is assembled (the same path on every rank)."""
        return self.folder / f".tmp-step_{step:08d}"

    def stage(self, step: int) -> Path:
        """Create an empty staging folder for ``step`` (main rank; the others write into it after)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._clean_partial()
        tmp = self.staging_path(step)
        tmp.mkdir()
        return tmp

    def commit(self, step: int, tmp: Path, state: dict[str, Any], config_yaml: str = "") -> Path:
        """Write ``state`` into the staged folder, mark it complete, move it into place, prune."""
        final = _finalize(tmp, self.path_for(step), state, config_yaml, f"step {step}")
        self._prune()
        return final

    def save(self, step: int, state: dict[str, Any], config_yaml: str = "") -> Path:
        """Write ``state`` atomically as the checkpoint of ``step`` (one writer) and prune old ones."""
        return self.commit(step, self.stage(step), state, config_yaml)

    def _clean_partial(self) -> None:
        for p in self.folder.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        """Drop all but the newest ``keep_last``: each is first renamed to a hidden ``.old-`` name
        (atomic), then deleted, so a kill mid-delete leaves debris that no listing takes for a
        checkpoint and the next save sweeps, never a step folder with a marker but missing files."""
        if self.keep_last is None:
            return
        done = self.complete()
        for _, path in done[: max(0, len(done) - self.keep_last)]:
            trash = path.parent / f".old-{path.name}-{os.getpid()}"
            path.rename(trash)
            _fsync_dir(path.parent)
            shutil.rmtree(trash, ignore_errors=True)


def checkpoint_format(state: dict) -> str:
    """``full`` (everything in state.pt), ``dcp`` (fsdp shards) or ``deepspeed``."""
    return state.get("format", "full")


ACCEPTED = ("give a mimscale run folder, its checkpoints/ folder, a step_* folder or its state.pt, an "
            "official MAE .pth, or a timm .pth/.bin/.safetensors file")


class ResolvedCheckpoint(NamedTuple):
    """What a checkpoint path means: ``kind`` is ``mimscale`` (``path`` is a complete checkpoint
    folder) or ``file`` (``path`` is a weights file: an official MAE or timm ``.pth``/``.bin``/
    ``.safetensors``; its contents tell which)."""

    kind: str
    path: Path


def _incomplete(folder: Path) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {folder} is incomplete (no {MARKER} marker or no {STATE_FILE}): it was "
        "interrupted while being written; use an earlier one or resume=auto")


def _looks_like_checkpoint(folder: Path) -> bool:
    return bool(_STEP_DIR.match(folder.name)) or (folder / STATE_FILE).exists() or (folder / MARKER).exists()


def resolve_checkpoint(path: str | os.PathLike) -> ResolvedCheckpoint:
    """The one meaning of every option that takes a checkpoint: a run folder or its
    ``checkpoints/`` folder -> the newest complete checkpoint; a checkpoint folder or its
    ``state.pt`` -> that checkpoint (only if complete); any other file -> a weights file. Reads
    no tensors; raises ``CheckpointError`` saying what is wrong and what works."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; {ACCEPTED}")
    if path.is_file():
        if path.name != STATE_FILE:
            return ResolvedCheckpoint("file", path)
        path = path.parent
    if is_complete(path):
        return ResolvedCheckpoint("mimscale", path)
    if _looks_like_checkpoint(path):
        raise _incomplete(path)
    for folder in (path / "checkpoints", path):
        if folder.is_dir() and any(_STEP_DIR.match(p.name) for p in folder.iterdir()):
            latest = CheckpointManager(folder).latest()
            if latest is None:
                break
            return ResolvedCheckpoint("mimscale", latest)
    raise CheckpointError(
        f"{path} holds no complete checkpoint (only step_* folders with a {MARKER} marker count, in "
        f"it or in its checkpoints/ folder); {ACCEPTED}")


def check_checkpoint_option(option: str, path: str | os.PathLike) -> None:
    """Config validation of an option that takes a checkpoint: a bad path fails before any work,
    as a ``ConfigError`` naming the option."""
    from mimscale.config import ConfigError

    try:
        resolve_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"{option}: {e}") from None


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """The complete mimscale checkpoint folder ``path`` names (a run folder: its newest); a weights
    file is refused, since it holds no run state."""
    kind, folder = resolve_checkpoint(path)
    if kind != "mimscale":
        raise CheckpointError(
            f"{folder} is a weights file, not a mimscale checkpoint (no run state: step, data position, "
            "optimizer); give a run folder, its checkpoints/ folder, a step_* folder or its state.pt")
    return folder


def read_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The ``state.pt`` of a complete checkpoint (any path ``checkpoint_folder`` accepts), without
    reading shards."""
    return load_file(checkpoint_folder(path) / STATE_FILE, map_location)


def full_model_state(folder: str | Path, state: dict) -> tuple[dict, dict | None]:
    """(the method's full state dict, the full FQN-keyed optimizer state or None) of any format."""
    from mimscale.pretrain.method import MIMMethod

    fmt = checkpoint_format(state)
    if fmt == "full":
        return MIMMethod.join_state_dict(state["model"], state.get("method", {})), state.get("optimizer")
    folder = Path(folder)
    folder = folder.parent if folder.name == STATE_FILE else folder
    if fmt == "dcp":
        from .fsdp import read_dcp

        return read_dcp(folder)
    if fmt == "deepspeed":
        from .zero import read_deepspeed

        model = read_deepspeed(folder)
        rank_states = state.get("rank_state") or [{}]
        return {**model, **rank_states[0]}, None
    raise ValueError(f"checkpoint {folder} has an unknown format {fmt!r}; valid: full, dcp, deepspeed")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A complete checkpoint as one dict, whichever backend wrote it: ``model`` (the student in the
    official MAE layout), ``method`` (teacher, heads, strategy state), ``optimizer`` (FQN-keyed;
    absent for DeepSpeed, whose optimizer state stays in its own files), ``step``, ``data``,
    ``rng``, ``config``, ... Sharded checkpoints are consolidated in memory (no process group)."""
    from mimscale.pretrain.method import MIMMethod

    folder = checkpoint_folder(path)
    state = read_state(folder, map_location)
    if checkpoint_format(state) == "full":
        return state
    model, optimizer = full_model_state(folder, state)
    student, method = MIMMethod.split_state_dict(model)
    out = {**state, "model": student, "method": method}
    if optimizer is not None:
        out["optimizer"] = optimizer
    return out


def resolve_resume(resume: str, manager: CheckpointManager) -> Path | None:
    """``none`` -> None; ``auto`` -> the newest complete checkpoint of this run (or None); else the
    checkpoint folder the path names (a run folder: its newest complete checkpoint)."""
    if resume in ("none", ""):
        return None
    if resume == "auto":
        return manager.latest()
    return checkpoint_folder(resume)
