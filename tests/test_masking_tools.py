"""`mimscale visualize masks`, `mimscale select-head`, `mimscale bench masking` through the CLI."""

import argparse
import json

import pytest
import torch
from object_attending import install_object_attention
from PIL import Image

from mimscale.cli import main
from mimscale.config import load_config
from mimscale.pretrain.engine.flops import packed_step_flops, step_flops
from mimscale.pretrain.masking import bench
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


def test_bench_masking_prints_ratios(tmp_path, capsys):
    """FLOP ratios from the analytic count, time ratios per round against MAE, overhead their quotient;
    the table prints what the JSON holds."""
    out = tmp_path / "masking.json"
    assert main(["bench", "masking", "--model", "mae_vit_tiny_patch16", "--img-size", "32", "--batch", "4",
                 "--rounds", "1", "--warmup-rounds", "1", "--steps-per-round", "1",
                 "--rows", "gpa,sbam_amr,cmae_2shot", "--json", str(out)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    rows = json.loads(out.read_text())
    assert [r["row"] for r in rows] == ["random (MAE)", "gpa (teacher b9)", "sbam_amr", "sbam_amr (packed)",
                                        "gpa (cache K=20)", "cmae_2shot (random)", "cmae_2shot (gpa-guided)",
                                        "cmae_2shot (packed)"]
    assert lines[0].startswith("| strategy") and len(lines) == 2 + len(rows)
    base = ["model.name=mae_vit_tiny_patch16", "model.img_size=32", "data.source=synthetic", "data.batch_size=4"]
    overrides = dict(bench.VARIANTS)
    mae = step_flops(load_config(base + overrides["random (MAE)"])).per_step
    assert rows[0]["time_ratio"] == 1.0 and rows[0]["flop_ratio"] == 1.0
    for r, line in zip(rows, lines[2:]):
        assert {"mask_ratio", "step_ms", "model", "img_size", "batch", "precision", "device"} <= r.keys()
        cfg = load_config(base + overrides[r["row"]])
        counts = r["visible_counts"]  # AMR rows: counted at the bench batch's own visible sets
        flops = packed_step_flops(cfg, counts) if counts else step_flops(cfg)
        assert (counts is not None) == r["row"].startswith("sbam_amr")
        assert r["flop_ratio"] == pytest.approx(flops.per_step / mae)
        assert r["overhead"] == pytest.approx(r["time_ratio"] / r["flop_ratio"])
        assert 0 < r["time_ratio_min"] <= r["time_ratio"] <= r["time_ratio_max"] and r["step_ms"] > 0
        cells = [c.strip() for c in line.split("|")[1:-1]]
        low, high = cells[4].split("–")
        assert cells[0] == r["row"]
        assert [cells[1], cells[2], cells[3], low, high, cells[5]] == [
            f"{r[k]:.3f}" for k in ("mask_ratio", "flop_ratio", "time_ratio", "time_ratio_min", "time_ratio_max",
                                    "overhead")]
    by = {r["row"]: r for r in rows}  # the scoring pass costs FLOPs; a shot after block 10 saves some
    # packed rows run --varlen (auto: masked on a CPU), the others pad
    assert {r["row"]: r["varlen"] for r in rows if "sbam_amr" in r["row"]} == {
        "sbam_amr": "padded", "sbam_amr (packed)": "masked"}
    assert by["gpa (teacher b9)"]["flop_ratio"] > 1 > by["cmae_2shot (random)"]["flop_ratio"]
    # the cache pays a twentieth of the scoring pass, in FLOPs and in the stated refresh time
    cached, online = by["gpa (cache K=20)"], by["gpa (teacher b9)"]
    assert cached["flop_ratio"] - 1 == pytest.approx((online["flop_ratio"] - 1) / 20)
    assert cached["refresh_ms"] > 0 and cached["cache_every_epochs"] == 20 and online["refresh_ms"] is None
    assert "refresh" in lines[2 + [r["row"] for r in rows].index("gpa (cache K=20)")]


def test_bench_masking_rows_are_checked(capsys):
    assert [label for label, _ in bench.select("cmae_2shot,idm")] == [
        "random (MAE)", "idm (online)", "idm (momentum)", "idm (momentum, cache K=20)", "cmae_2shot (random)",
        "cmae_2shot (gpa-guided)", "cmae_2shot (packed)"]
    assert [label for label, _ in bench.select("ccmim (with")] == [
        "random (MAE)", "ccmim (with contrast)", "ccmim (with contrast, cache K=20)"]
    assert main(["bench", "masking", "--rows", "block,nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "cmae_2shot (gpa-guided)" in err and "'block'" not in err
    assert main(["bench", "masking", "--device", "cpu", "--varlen", "flex"]) == 2
    assert "no backward on a CPU" in capsys.readouterr().err
