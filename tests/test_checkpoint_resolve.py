"""One meaning for every option that takes a checkpoint: a run folder, its checkpoints/ folder, a
step folder, its state.pt and an official MAE .pth give the same weights to every reader, and bad
paths fail with the same CheckpointError everywhere."""

from __future__ import annotations

import argparse
import shutil

import pytest
import torch
from distributed_utils import tiny_overrides

from mimscale.cli import main
from mimscale.config import load_config
from mimscale.downstream.classify.weights import read_weights as classify_weights
from mimscale.downstream.dense.weights import read_encoder_weights
from mimscale.errors import CheckpointError
from mimscale.pretrain.engine.checkpoint import CheckpointManager, load_checkpoint, resolve_resume
from mimscale.pretrain.engine.trainer import Trainer
from mimscale.pretrain.method import MIMMethod
from mimscale.pretrain.teacher import frozen_teacher
from mimscale.tools.analysis.encoders import read_weights as analysis_weights

MODEL = "mae_vit_tiny_patch16"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 2-step run with a checkpoint at each step, plus an interrupted third one."""
    root = tmp_path_factory.mktemp("resolve")
    overrides = tiny_overrides(root / "run", root / "data") + [
        "schedule.max_steps=2", "output.checkpoint_every=1", "output.keep_last=null"]
    Trainer(load_config(overrides)).fit()
    half = root / "run" / "checkpoints" / "step_00000003"
    shutil.copytree(root / "run" / "checkpoints" / "step_00000002", half)
    (half / "COMPLETE").unlink()
    return root / "run"


@pytest.fixture(scope="module")
def sources(run, tmp_path_factory):
    """Every way of naming the newest checkpoint, and the same weights as an official MAE file."""
    step = run / "checkpoints" / "step_00000002"
    mae = tmp_path_factory.mktemp("mae") / "mae_pretrain.pth"
    torch.save({"model": load_checkpoint(step)["model"], "args": argparse.Namespace(mask_ratio=0.75)}, mae)
    return {"run": run, "checkpoints": run / "checkpoints", "step": step, "state.pt": step / "state.pt",
            "mae.pth": mae}


def _teacher(path):
    return frozen_teacher(str(path), MODEL, 32, 8, 12).state_dict()


def _resume(path):
    return load_checkpoint(resolve_resume(str(path), CheckpointManager(path)))["model"]


READERS = {
    "teacher.checkpoint": _teacher,
    "analysis": lambda p: analysis_weights(p)[0],
    "classify": lambda p: classify_weights(p).state,
    "dense": lambda p: read_encoder_weights(p).state,
    "resume": _resume,
}


def _assert_same(a: dict, b: dict) -> None:
    """Equal on every encoder key they share (one may hold a decoder or a truncated teacher)."""
    shared = sorted(set(a) & set(b))
    assert {"blocks.0.attn.qkv.weight", "pos_embed", "patch_embed.proj.weight"} <= set(shared)
    for k in shared:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("reader", READERS)
def test_every_way_of_naming_a_checkpoint_gives_the_same_weights(reader, sources, run):
    read = READERS[reader]
    names = [n for n in sources if not (reader == "resume" and n == "mae.pth")]  # weights hold no run state
    got = {name: read(sources[name]) for name in names}
    for name in names[1:]:
        _assert_same(got[names[0]], got[name])
    older = read(run / "checkpoints" / "step_00000001")  # the run folder means its newest complete one
    assert not torch.equal(older["blocks.0.attn.qkv.weight"], got["run"]["blocks.0.attn.qkv.weight"])


def test_a_run_folder_is_a_teacher_and_a_resume_point(run, tmp_path):
    base = tiny_overrides(tmp_path / "new", tmp_path / "data")
    gpa = MIMMethod(load_config(base + ["masking.strategy=gpa", "masking.gpa.block=1", "masking.gpa.head=mean",
                                        "teacher.type=frozen", f"teacher.checkpoint={run}"]))
    _assert_same(gpa.teacher.state_dict(), _teacher(run / "checkpoints" / "step_00000002"))
    assert Trainer(load_config(base + [f"resume={run}"])).step == 2


def test_resume_refuses_a_weights_file(sources):
    with pytest.raises(CheckpointError, match=r"mae_pretrain.pth is a weights file, not a mimscale checkpoint"):
        resolve_resume(str(sources["mae.pth"]), CheckpointManager(sources["run"]))


def _bad_paths(run, root):
    """(path, the words its error must contain) for every kind of bad checkpoint path."""
    empty = root / "empty"
    empty.mkdir()
    unfinished = root / "unfinished_run"
    shutil.copytree(run / "checkpoints" / "step_00000003", unfinished / "checkpoints" / "step_00000003")
    truncated = root / "truncated.pth"
    truncated.write_bytes((run / "checkpoints" / "step_00000002" / "state.pt").read_bytes()[:5000])
    text = root / "notes.pth"
    text.write_text("not a checkpoint")
    blank = root / "blank.safetensors"
    blank.write_bytes(b"\x00" * 12)
    none_complete = r"holds no complete checkpoint \(only step_\* folders with a COMPLETE marker count"
    unreadable = r"is not a readable checkpoint .*: it is damaged, truncated or not a tensor file"
    return [
        (root / "missing.pth", r"missing.pth does not exist; give a mimscale run folder"),
        (empty, f"empty {none_complete}"),
        (unfinished, f"unfinished_run {none_complete}"),
        (run / "checkpoints" / "step_00000003", r"step_00000003 is incomplete \(no COMPLETE marker or no "
                                                r"state.pt\): it was interrupted while being written"),
        (truncated, f"truncated.pth {unreadable}"),
        (text, f"notes.pth {unreadable}"),
        (blank, f"blank.safetensors {unreadable}"),
    ]


@pytest.mark.parametrize("reader", READERS)
def test_bad_paths_fail_with_the_same_checkpoint_error_everywhere(reader, run, tmp_path):
    for path, words in _bad_paths(run, tmp_path):
        if reader == "resume" and path.is_file():
            continue  # resume refuses any weights file before reading it (test above)
        with pytest.raises(CheckpointError, match=words):
            READERS[reader](path)


def test_config_options_resolve_before_any_work(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for command, option, data in (("knn", "checkpoint", "data.dataset=synthetic"),
                                  ("segment", "backbone.checkpoint", f"data.root={tmp_path}")):
        assert main([command, f"{option}={tmp_path / 'empty'}", data, f"output.dir={tmp_path / 'out'}"]) == 2
        assert f"{option}: {tmp_path / 'empty'} holds no complete checkpoint" in capsys.readouterr().err
