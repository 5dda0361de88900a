"""Atomic checkpoints: a crash mid-write leaves the previous checkpoint loadable."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from mimscale.errors import CheckpointError
from mimscale.pretrain.engine import checkpoint as ckpt
from mimscale.pretrain.engine.checkpoint import CheckpointManager, load_checkpoint, resolve_resume


def _state(v):
    return {"model": {"w": torch.full((4,), float(v))}, "step": v}


def test_save_list_prune(tmp_path):
    m = CheckpointManager(tmp_path / "ck", keep_last=2)
    for s in (1, 2, 3):
        m.save(s, _state(s), "cfg: 1\n")
    assert [s for s, _ in m.complete()] == [2, 3]
    assert load_checkpoint(m.latest())["step"] == 3
    assert (m.latest() / "config.yaml").read_text() == "cfg: 1\n"
    m.save(3, _state(33))  # re-saving a step replaces it in place
    assert load_checkpoint(m.latest())["step"] == 33


def test_a_kill_while_pruning_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """Pruning renames a checkpoint out of the step_* namespace before deleting it: a process
    killed mid-delete leaves hidden debris (swept by the next save), never a step folder that holds
    its COMPLETE marker but not its files."""
    m = CheckpointManager(tmp_path / "ck", keep_last=1)
    m.save(1, _state(1), "cfg: 1\n")
    real_rmtree = ckpt.shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        os.remove(os.path.join(path, ckpt.STATE_FILE))  # one file gone, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        m.save(2, _state(2), "cfg: 1\n")
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    steps = sorted(p.name for p in m.folder.iterdir() if p.name.startswith("step_"))
    assert steps == ["step_00000002"] and [s for s, _ in m.complete()] == [2]
    debris = [p for p in m.folder.iterdir() if p.name.startswith(".old-step_00000001")]
    assert len(debris) == 1 and (debris[0] / ckpt.MARKER).exists()  # half deleted, but hidden
    assert load_checkpoint(tmp_path / "ck")["step"] == 2
    m.save(3, _state(3))  # the next save sweeps the debris; keep_last still bounds the folders
    assert sorted(p.name for p in m.folder.iterdir()) == ["step_00000003"]


def test_crash_mid_write_keeps_previous(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path / "ck")
    m.save(10, _state(10))
    real_save = torch.save

    def crashing_save(obj, f):
        real_save(obj, f)
        f.truncate(7)  # half-written file, then the process "dies"
        raise RuntimeError("simulated crash during write")

    monkeypatch.setattr(ckpt.torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        m.save(20, _state(20))
    monkeypatch.undo()
    leftovers = [p.name for p in m.folder.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the interrupted save should have left its temporary folder"
    assert m.latest() == m.path_for(10)
    assert resolve_resume("auto", m) == m.path_for(10)
    assert load_checkpoint(resolve_resume("auto", m))["step"] == 10
    m.save(30, _state(30))  # the next save sweeps the debris
    assert not [p for p in m.folder.iterdir() if p.name.startswith(".tmp-")]


def test_sigkill_during_write_keeps_previous(tmp_path):
    folder = tmp_path / "ck"
    CheckpointManager(folder).save(1, _state(1))
    child = textwrap.dedent(f"""
        import torch
        from mimscale.pretrain.engine.checkpoint import CheckpointManager
        big = {{"model": {{f"w{{i}}": torch.randn(4_000_000) for i in range(60)}}, "step": 2}}
        CheckpointManager({str(folder)!r}).save(2, big)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    deadline = time.time() + 60
    while time.time() < deadline:
        tmp = [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
        if tmp and (tmp[0] / "state.pt").exists() and (tmp[0] / "state.pt").stat().st_size > 0:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    m = CheckpointManager(folder)
    assert [s for s, _ in m.complete()] == [1]
    assert load_checkpoint(resolve_resume("auto", m))["step"] == 1


def test_incomplete_or_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    half = tmp_path / "step_00000005"
    half.mkdir()
    (half / "state.pt").write_bytes(b"12")
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(half), CheckpointManager(tmp_path))
    assert resolve_resume("auto", CheckpointManager(tmp_path)) is None
    assert resolve_resume("none", CheckpointManager(tmp_path)) is None
