"""`mimscale visualize masks`, `mimscale select-head`, `mimscale bench masking` through the CLI."""

import argparse

import pytest
import torch
from object_attending import install_object_attention
from PIL import Image

from mimscale.cli import main
from mimscale.pretrain.models import build_mae

TINY = ["model.name=mae_vit_tiny_patch16", "model.img_size=64", "model.patch_size=8", "model.decoder_embed_dim=32",
        "model.decoder_depth=1", "model.decoder_num_heads=2"]


@pytest.fixture(scope="module")
def attending_pth(tmp_path_factory):
    model = install_object_attention(build_mae("mae_vit_tiny_patch16", img_size=64, patch_size=8,
                                               decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2))
    path = tmp_path_factory.mktemp("ckpt") / "attending.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace()}, path)
    return path


def test_visualize_masks_writes_png(tmp_path, attending_pth, capsys):
    out = tmp_path / "masks.png"
    assert main(["visualize", "masks", "--checkpoint", str(attending_pth), "--num", "3", "--out", str(out), *TINY]) == 0
    assert "3 images x 7 strategies" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.width > 1000 and im.height > 200


def test_visualize_masks_on_a_folder_with_random_init(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (80, 70), (40 * i, 100, 200)).save(folder / f"{i}.png")
    out = tmp_path / "m.png"
    assert main(["visualize", "masks", "--images", str(folder), "--strategies", "random,sbam_amr",
                 "--out", str(out), *TINY]) == 0
    assert out.exists()
    assert main(["visualize", "masks", "--strategies", "magic", "--out", str(out), *TINY]) == 2
    assert "unknown strategies ['magic']" in capsys.readouterr().err


def test_select_head_finds_the_attending_block(attending_pth, capsys):
    assert main(["select-head", "--checkpoint", str(attending_pth), "--num-images", "24", "--ratio", "0.5", *TINY]) == 0
    text = capsys.readouterr().out
    assert "best: block 11, head" in text  # the only block whose attention follows the objects
    best = float(text.split("(recall ")[1].split(")")[0])
    assert best > 0.75, text


def test_tools_take_a_run_folder(tiny_overrides, tmp_path, capsys):
    """A run folder means its newest complete checkpoint, as for `mimscale analyze`."""
    assert main(["pretrain", *tiny_overrides, "schedule.max_steps=2"]) == 0
    run = tmp_path / "run"
    out = tmp_path / "m.png"
    assert main(["visualize", "masks", "--checkpoint", str(run), "--num", "2", "--strategies", "random,sbam",
                 "--out", str(out)]) == 0
    assert f"from {run}" in capsys.readouterr().out and out.exists()
    assert main(["select-head", "--checkpoint", str(run / "checkpoints"), "--num-images", "4"]) == 0
    assert "best: block " in capsys.readouterr().out
    empty = tmp_path / "empty" / "checkpoints" / "step_00000001"
    empty.mkdir(parents=True)  # a checkpoint interrupted while being written
    assert main(["select-head", "--checkpoint", str(tmp_path / "empty"), "--num-images", "4"]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_bench_masking_prints_ratios(capsys):
    assert main(["bench", "masking", "--model", "mae_vit_tiny_patch16", "--img-size", "32", "--batch", "2",
                 "--rounds", "1"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| strategy") and len(lines) == 2 + 11
    assert lines[2].startswith("| random (MAE) | ") and "| 1.00 |" in lines[2]
    for ln in lines[2:]:
        assert float(ln.split("|")[2]) >= 0
