"""`mimscale segment` end to end on the CPU: UperNet on a briefly pretrained tiny ViT beats the
majority-class baseline on held-out generated ADE20K-layout images."""

import json

import dense_support
import pytest

from mimscale.cli import main

tiny_mae_checkpoint = dense_support.tiny_mae_checkpoint
synthetic_ade = dense_support.synthetic_ade

TINY_SEGMENT = [
    "backbone.drop_path=0.0", "model.channels=32", "model.aux_channels=16", "model.pool_scales=[1,2]",
    "data.num_classes=7", "data.crop_size=64", "data.scale=[128,64]", "data.ratio_range=[0.75,1.5]",
    "data.test_stride=48", "data.batch_size=4", "schedule.warmup_iters=10", "optim.lr=1e-3",
    "optim.layer_decay=0.9", "engine.device=cpu", "engine.precision=fp32", "engine.num_workers=0",
    "engine.threads=1", "output.log_every=25", "output.progress=off",
]


@pytest.mark.slow
def test_segment_beats_the_majority_class_on_held_out_images(tiny_mae_checkpoint, synthetic_ade, tmp_path):
    run = tmp_path / "seg"
    assert main(["segment", *TINY_SEGMENT, f"backbone.checkpoint={tiny_mae_checkpoint}",
                 f"data.root={synthetic_ade}", "schedule.iters=120", f"output.dir={run}"]) == 0
    m = json.loads((run / "eval.json").read_text())
    print(f"\nsegment on 24 held-out images after 120 iterations: mIoU {m['mIoU']:.4f} mAcc {m['mAcc']:.4f} "
          f"aAcc {m['aAcc']:.4f}; majority-class mIoU {m['majority_mIoU']:.4f}")
    assert m["classes"][0] == "background" and len(m["IoU"]) == 7
    assert m["mIoU"] > m["majority_mIoU"] + 0.04
    assert m["aAcc"] > 0.5


def test_segment_rejects_bad_options(tmp_path, capsys):
    assert main(["segment", "data.test_stride=600", f"data.root={tmp_path}", "backbone.name=mae_vit_tiny_patch16"]) == 2
    assert "data.test_stride" in capsys.readouterr().err
    assert main(["segment", "backbone.checkpoint=/nonexistent", f"data.root={tmp_path}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_synthetic_flag_writes_the_data_and_runs_the_command(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["segment", "--synthetic", "8", "--synthetic-size", "32", "backbone.name=mae_vit_tiny_patch16",
                 "backbone.patch_size=8", "backbone.pretrain_img_size=32", *TINY_SEGMENT, "data.crop_size=32",
                 "data.scale=[32,32]", "data.test_stride=32", "schedule.iters=2", "output.log_every=1", f"output.dir={run}"]) == 0
    assert len(list((run / "data" / "images" / "training").iterdir())) == 8
    m = json.loads((run / "eval.json").read_text())
    assert m["iter"] == 2 and m["pixels"] == 2 * 32 * 32 and len(m["IoU"]) == 7
    assert "mIoU" in capsys.readouterr().out
    # continue the finished run for two more iterations from its checkpoint
    assert main(["segment", "backbone.name=mae_vit_tiny_patch16", "backbone.patch_size=8",
                 "backbone.pretrain_img_size=32", *TINY_SEGMENT, f"data.root={run / 'data'}", "data.crop_size=32",
                 "data.scale=[32,32]", "data.test_stride=32", "schedule.iters=4", "resume=auto", "output.log_every=1",
                 f"output.dir={run}"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2, 3, 4, 4]  # train 1-2, eval at 2, resumed 3-4, eval at 4
    assert json.loads((run / "eval.json").read_text())["iter"] == 4


def test_labels_beyond_num_classes_stop_with_the_option_named(synthetic_ade, tmp_path, capsys):
    """7 classes trained as 2: one line naming data.num_classes at the first batch, not an index
    error inside cross-entropy."""
    args = ["segment", "backbone.name=mae_vit_tiny_patch16", "backbone.patch_size=8", "backbone.pretrain_img_size=32",
            *TINY_SEGMENT, "data.num_classes=2", f"data.root={synthetic_ade}", "schedule.iters=2",
            f"output.dir={tmp_path / 'run'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mimscale segment: labels [") and "outside 0..1" in err[-1]
    assert "data.num_classes" in err[-1] and not any("Traceback" in line for line in err)
