"""Every analysis command through the CLI, on the synthetic set and a checkpoint trained a few steps:
each writes its CSV and PNG. Guided masks over hand-set object-attending weights beat random."""

import argparse
import csv
import json
import math

import numpy as np
import pytest
import torch
from object_attending import install_object_attention, install_object_salience
from PIL import Image

from mimscale.cli import main
from mimscale.pretrain.engine.checkpoint import load_checkpoint
from mimscale.pretrain.models import build_mae, to_timm_state_dict

MODEL = ["model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8",
         "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny SBAM+AMR pretraining of a few steps (its log has mask ratios and salience entropy)."""
    root = tmp_path_factory.mktemp("analysis_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIMSCALE_CACHE", str(root / "cache"))
        assert main(["pretrain", *MODEL, "data.source=synthetic", "data.synthetic_images=32",
                     "data.synthetic_size=40", "data.batch_size=8", "data.num_workers=0", "optim.blr=1e-3",
                     "schedule.max_steps=3", "schedule.warmup_steps=1", "engine.precision=fp32",
                     "masking.strategy=sbam_amr", "logging.log_every=1", "logging.image_every=0",
                     "logging.progress=off", "logging.tensorboard=false", "engine.memory_report_steps=0",
                     f"output.dir={root / 'sbam_amr'}"]) == 0
    return root / "sbam_amr"


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """The trained weights as an official MAE .pth and as a timm state dict (with a classifier)."""
    folder = tmp_path_factory.mktemp("exported")
    state = load_checkpoint(next((run_dir / "checkpoints").iterdir()))["model"]
    torch.save({"model": state, "args": argparse.Namespace(model="mae_vit_tiny_patch16")}, folder / "mae.pth")
    model = build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, decoder_embed_dim=32, decoder_depth=1,
                      decoder_num_heads=2)
    model.load_state_dict(state)
    torch.save({**to_timm_state_dict(model), "head.weight": torch.zeros(6, 192), "head.bias": torch.zeros(6)},
               folder / "timm.pth")
    return folder


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path, min_width=300):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= min_width and im.height >= 200


def test_analyze_attention_of_mimscale_official_mae_and_timm_checkpoints(run_dir, exported, tmp_path, capsys):
    out = tmp_path / "att"
    assert main(["analyze", "attention", str(run_dir), str(exported / "mae.pth"), str(exported / "timm.pth"),
                 "--num-images", "6", "--batch-size", "3", "--out", str(out)]) == 0
    assert "over 6 synthetic images" in capsys.readouterr().out
    rows = read_csv(out / "attention.csv")
    assert len(rows) == 3 * 12 * 3 and set(rows[0]) == {"checkpoint", "block", "head", "distance_px", "entropy"}
    by_label = {}
    for r in rows:
        by_label.setdefault(r["checkpoint"], []).append((float(r["distance_px"]), float(r["entropy"])))
    assert list(by_label) == ["sbam_amr@3", "mae", "timm"]
    for values in by_label.values():  # the same weights in three file formats: the same numbers
        assert np.array(values) == pytest.approx(np.array(by_label["sbam_amr@3"]), rel=1e-4)
    for d, e in by_label["mae"]:
        assert 0 < d < 8 * 3 * math.sqrt(2) and 0 < e <= math.log(16) + 1e-4
    assert_png(out / "attention.png", 800)


def test_analyze_attention_on_an_image_folder_with_labels(run_dir, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (50, 40), (80 * i, 120, 30)).save(folder / f"{i}.jpg")
    out = tmp_path / "att"
    assert main(["analyze", "attention", str(run_dir), "--images", str(folder), "--labels", "trained",
                 "--out", str(out)]) == 0
    assert {r["checkpoint"] for r in read_csv(out / "attention.csv")} == {"trained"}
    assert main(["analyze", "attention", str(run_dir), "--labels", "a,b", "--out", str(out)]) == 2
    assert main(["analyze", "attention", str(tmp_path / "missing.pth"), "--out", str(out)]) == 2


def test_analyze_cka_of_a_checkpoint_with_itself_and_with_another(run_dir, exported, tmp_path):
    out = tmp_path / "cka"
    assert main(["analyze", "cka", str(run_dir), "--num-images", "8", "--batch-size", "4", "--out", str(out)]) == 0
    rows = read_csv(out / "cka.csv")
    assert len(rows) == 12 and len(rows[0]) == 13
    matrix = torch.tensor([[float(v) for k, v in r.items() if k.startswith("block_")] for r in rows])
    torch.testing.assert_close(torch.diagonal(matrix), torch.ones(12), rtol=0, atol=1e-4)
    assert_png(out / "cka.png")

    init = tmp_path / "init.pth"
    torch.save(to_timm_state_dict(build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8)), init)
    assert main(["analyze", "cka", str(run_dir), str(init), "--num-images", "8", "--batch-size", "4",
                 "--out", str(out)]) == 0
    rows = read_csv(out / "cka.csv")
    assert list(rows[0])[0] == "sbam_amr@3 \\ init"
    values = [float(v) for r in rows for k, v in r.items() if k.startswith("block_")]
    assert all(-0.5 < v < 1 + 1e-6 for v in values) and min(values) < 0.999
    assert main(["analyze", "cka", str(run_dir), str(init), str(init), "--out", str(out)]) == 2
    assert main(["analyze", "cka", str(run_dir), "--batch-size", "2", "--out", str(out)]) == 2


def test_analyze_masks_of_a_trained_checkpoint_reports_adaptive_ratios(run_dir, tmp_path, capsys):
    out = tmp_path / "masks"
    assert main(["analyze", "masks", "--checkpoint", str(run_dir), "--strategies", "random,sbam_amr",
                 "--num-images", "24", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| random | 0.750 |" in text
    rows = {r["strategy"]: r for r in read_csv(out / "masks.csv")}
    assert set(rows) == {"random", "sbam_amr"}
    assert float(rows["random"]["random_object_hidden"]) == pytest.approx(0.75)
    assert rows["random"]["ratio_size_corr"] == ""                  # a fixed ratio has no correlation
    assert 0.6 - 1e-6 <= float(rows["sbam_amr"]["mean_ratio"]) <= 0.9 + 1e-6
    per_image = [r for r in read_csv(out / "masks_per_image.csv") if r["strategy"] == "sbam_amr"]
    assert len(per_image) == 24
    if len({r["mask_ratio"] for r in per_image}) > 1:                # AMR varied: a correlation is reported
        assert -1 <= float(rows["sbam_amr"]["ratio_size_corr"]) <= 1
    assert_png(out / "masks.png")


@pytest.fixture(scope="module")
def scorer_checkpoints(tmp_path_factory):
    """Official-MAE-format files whose weights single out the synthetic objects: CLS / GPA attention
    (IDM, GPA, ccMIM) and input salience (SBAM)."""
    folder = tmp_path_factory.mktemp("scorers")

    def tiny():
        return build_mae("mae_vit_tiny_patch16", img_size=64, patch_size=8, decoder_embed_dim=32, decoder_depth=1,
                         decoder_num_heads=2)

    torch.save({"model": install_object_attention(tiny()).state_dict()}, folder / "attending.pth")
    torch.save({"model": install_object_salience(tiny()).state_dict()}, folder / "salient.pth")
    return folder


def test_guided_strategies_hide_objects_more_than_random(scorer_checkpoints, tmp_path, capsys):
    out = tmp_path / "masks"
    sal = scorer_checkpoints / "salient.pth"
    assert main(["analyze", "masks", "--checkpoint", str(scorer_checkpoints / "attending.pth"),
                 "--strategies", f"random,idm,gpa,ccmim,sbam={sal},sbam_amr={sal}", "--num-images", "32",
                 "--out", str(out), "masking.ratio=0.5", "masking.gpa.block=-1"]) == 0  # sizes: from the weights
    with capsys.disabled():
        print("\n" + capsys.readouterr().out)
    rows = {r["strategy"]: r for r in read_csv(out / "masks.csv")}
    assert abs(float(rows["random"]["object_hidden"]) - 0.5) < 0.1
    for name in ("idm", "gpa", "ccmim", "sbam (salient)", "sbam_amr (salient)"):
        r = rows[name]
        obj, bg, rand = float(r["object_hidden"]), float(r["background_hidden"]), float(r["random_object_hidden"])
        assert obj > rand + 0.15 and obj > bg, (name, r)
        assert float(r["object_lift"]) == pytest.approx(obj / rand, rel=1e-4)
    assert_png(out / "masks.png", 800)


def test_analyze_masks_with_a_folder_of_mask_pngs(run_dir, tmp_path):
    images, masks = tmp_path / "images" / "a", tmp_path / "masks" / "a"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 64), (30 * i, 90, 160)).save(images / f"{i}.jpg")
        m = Image.new("L", (64, 64), 0)
        m.paste(255, (0, 0, 32, 64))                  # the object: the left half
        m.save(masks / f"{i}.png")
    out = tmp_path / "out"
    args = ["analyze", "masks", "--checkpoint", str(run_dir), "--strategies", "random", "--images",
            str(tmp_path / "images"), "--out", str(out)]
    assert main([*args, "--masks", str(tmp_path / "masks")]) == 0
    per_image = read_csv(out / "masks_per_image.csv")
    assert [float(r["object_size"]) for r in per_image] == [0.5, 0.5, 0.5]
    assert main(args) == 2                            # no foreground given
    (masks / "2.png").unlink()
    assert main([*args, "--masks", str(tmp_path / "masks")]) == 2


def test_analyze_pimr_from_a_csv_and_from_result_records(tmp_path, capsys):
    table = tmp_path / "acc.csv"
    table.write_text("model,mask_ratio,accuracy\n"
                     "sbam,0.5,80\nsbam,0.6,82\nsbam,0.75,84\nsbam,0.9,83\n"
                     "mae,0.5,70\nmae,0.6,75\nmae,0.75,80\nmae,0.9,78\n")
    out = tmp_path / "pimr"
    assert main(["analyze", "pimr", str(table), "--out", str(out)]) == 0
    assert "| sbam | 0.75 | 84 | 1 | 1.000 | 1.000 |" in capsys.readouterr().out
    rows = read_csv(out / "pimr.csv")
    got = {(r["model"], float(r["mask_ratio"])): (float(r["pimr"]), float(r["global_pimr"])) for r in rows}
    assert got[("sbam", 0.9)] == pytest.approx((0.75, 13 / 14))
    assert got[("mae", 0.6)] == pytest.approx((0.5, 5 / 14))
    assert got[("mae", 0.5)] == pytest.approx((0.0, 0.0))
    assert_png(out / "pimr.png", 800)

    results = tmp_path / "results"
    (results / "run1").mkdir(parents=True)
    for i, (recipe, ratio, value) in enumerate([("mae", 0.6, 70.0), ("mae", 0.75, 72.0), ("sbam", 0.6, 73.0),
                                                ("sbam", 0.75, 74.0)]):
        record = {"benchmark": "linprobe", "metric": "top1", "value": value, "recipe": recipe, "mask_ratio": ratio}
        (results / "run1" / f"{i}.json").write_text(json.dumps(record))
    (results / "run1" / "other.json").write_text(json.dumps({"benchmark": "knn", "value": 1.0, "recipe": "mae",
                                                             "mask_ratio": 0.6}))
    assert main(["analyze", "pimr", str(results), "--benchmark", "linprobe", "--out", str(out)]) == 0
    got = {(r["model"], float(r["mask_ratio"])): float(r["global_pimr"]) for r in read_csv(out / "pimr.csv")}
    assert got == pytest.approx({("mae", 0.6): 0.0, ("mae", 0.75): 0.5, ("sbam", 0.6): 0.75, ("sbam", 0.75): 1.0})
    assert main(["analyze", "pimr", str(tmp_path / "nope.csv"), "--out", str(out)]) == 2


def test_plot_overlays_runs_and_draws_every_metric(run_dir, tmp_path, capsys):
    other = tmp_path / "cmae_idm"
    other.mkdir()
    with open(other / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step, "time": 100.0 + step, "epoch": step // 3, "loss": 1.0 / step,
                                "loss_pixel": 0.9 / step, "loss_shot1": 0.8, "loss_shot2": 0.7,
                                **{f"plb_p_{h}": 0.25 for h in range(4)}, "lr": 1e-4 * step,
                                "grad_norm": None if step == 2 else 1.0, "images_per_s": 50.0,
                                "my_metric": 3.0, "note": "text"}) + "\n")
    out = tmp_path / "curves"
    assert main(["plot", str(run_dir), str(other), "--smooth", "0.5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for panel in ("loss terms", "per-shot losses", "PLB head distribution", "mask ratios and schedules",
                  "salience entropy", "learning rate", "throughput", "gradient norm", "my_metric"):
        assert panel in text, panel
    rows = read_csv(out / "curves.csv")
    assert {r["run"] for r in rows} == {"sbam_amr", "cmae_idm"}
    metrics = {r["metric"] for r in rows if r["run"] == "cmae_idm"}
    assert {"loss", "loss_shot2", "plb_p_3", "my_metric", "grad_norm"} <= metrics and "note" not in metrics
    assert len([r for r in rows if r["run"] == "cmae_idm" and r["metric"] == "grad_norm"]) == 4  # None skipped
    assert {"mask_ratio", "salience_entropy", "images_per_s"} <= {r["metric"] for r in rows if r["run"] == "sbam_amr"}
    assert_png(out / "curves.png", 1000)
    assert main(["plot", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert main(["plot", str(other), "--smooth", "1.5", "--out", str(out)]) == 2
