"""``mimscale convert``: timm export of the student (and teacher), plain checkpoints, clear errors.
(Consolidating fsdp and deepspeed checkpoints is tested on real 2-rank ones in
test_distributed_backends.py.)"""

from __future__ import annotations

import pytest
import timm
import torch
from distributed_utils import one_thread  # noqa: F401  (autouse fixture)
from safetensors.torch import load_file

from mimscale.cli import main
from mimscale.config import from_dict
from mimscale.pretrain.engine.checkpoint import load_checkpoint
from mimscale.pretrain.engine.trainer import Trainer
from mimscale.pretrain.method import build_model
from mimscale.pretrain.models import to_timm_state_dict


@pytest.fixture
def checkpoint(tiny_config):
    """A 2-step run with a full-depth EMA teacher."""
    return Trainer(tiny_config("schedule.max_steps=2", "teacher.type=ema")).fit().checkpoint


def _vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8)


@pytest.mark.parametrize("suffix,read", [(".safetensors", load_file),
                                         (".pth", lambda p: torch.load(p, weights_only=True))])
def test_timm_export_of_student_and_teacher(checkpoint, tmp_path, suffix, read):
    out = tmp_path / f"encoder{suffix}"
    assert main(["convert", str(checkpoint), "--to", "timm", "--out", str(out)]) == 0
    state = load_checkpoint(checkpoint)
    student = build_model(from_dict(state["config"]))
    student.load_state_dict(state["model"])
    exported = read(out)
    assert exported.keys() == to_timm_state_dict(student).keys()
    for k, v in to_timm_state_dict(student).items():
        assert torch.equal(exported[k], v), k
    _vit().load_state_dict(exported, strict=True)
    teacher = read(tmp_path / f"encoder.teacher{suffix}")
    _vit().load_state_dict(teacher, strict=True)  # a full-depth EMA teacher is a whole encoder
    for k, v in teacher.items():
        assert torch.equal(v, state["method"][f"teacher.{k}"]), k
    assert not torch.equal(teacher["blocks.0.mlp.fc1.weight"], exported["blocks.0.mlp.fc1.weight"])


def test_plain_checkpoint_of_a_plain_checkpoint_is_the_same_state(checkpoint, tmp_path):
    assert main(["convert", str(checkpoint), "--from", "ddp", "--out", str(tmp_path / "copy")]) == 0
    a, b = load_checkpoint(checkpoint), load_checkpoint(tmp_path / "copy")
    assert b["format"] == "full" and b["step"] == a["step"] == 2
    for part in ("model", "method"):
        for k, v in a[part].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(b[part][k], v), k
    assert (tmp_path / "copy" / "COMPLETE").is_file() and (tmp_path / "copy" / "config.yaml").is_file()


def test_errors_name_what_is_wrong(checkpoint, tmp_path, capsys):
    assert main(["convert", str(checkpoint), "--from", "fsdp", "--out", str(tmp_path / "x")]) == 2
    assert "was written by ddp" in capsys.readouterr().err
    assert main(["convert", str(checkpoint), "--to", "timm", "--out", str(tmp_path / "enc.bin")]) == 2
    assert ".safetensors, .pth or .pt" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    half = tmp_path / "step_00000009"
    half.mkdir()
    (half / "state.pt").write_bytes(b"12")
    assert main(["convert", str(half), "--out", str(tmp_path / "x")]) == 2
    assert "incomplete" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_help_describes_every_target(capsys):
    from mimscale.cli import build_parser

    convert = next(a for a in build_parser()._subparsers._group_actions).choices["convert"]
    for target in ("timm", "mmdet", "mmseg"):
        assert target in convert.description
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    out_help = text.split("--out OUT")[-1].split("--from")[0]  # what --out is for each target
    assert "--to timm" in out_help and "--to mmdet / mmseg" in out_help
