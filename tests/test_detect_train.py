"""`mimscale detect` end to end on the CPU: a briefly pretrained tiny ViT, a few hundred
iterations on generated COCO images, box AP on held-out images clearly above zero."""

import json

import dense_support
import pytest
from extras import need

from mimscale.cli import main

tiny_mae_checkpoint = dense_support.tiny_mae_checkpoint
synthetic_coco = dense_support.synthetic_coco

# Mask R-CNN shrunk to CPU size; everything else is the command's real path.
TINY_DETECT = [
    "backbone.window_size=0", "backbone.drop_path=0.0",  # 8x8 patches: windows would only cost
    "model.fpn_channels=32", "model.head_channels=32", "model.fc_dim=128", "model.box_convs=0",
    "model.mask_convs=1", "model.anchor_sizes=[12,24,48,96,192]", "model.proposals_train=100",
    "model.proposals_test=50", "model.rpn_batch_size_per_image=64", "model.box_batch_size_per_image=32",
    "data.image_size=64", "data.lsj_scale=[0.8,1.25]", "data.batch_size=4",
    "schedule.warmup_iters=20", "optim.lr=1e-3", "optim.layer_decay=0.9", "optim.weight_decay=0.05",
    "engine.device=cpu", "engine.precision=fp32", "engine.num_workers=0", "engine.threads=1",
    "output.log_every=25", "output.checkpoint_every=100", "output.progress=off",
]


@pytest.mark.slow
def test_detect_learns_boxes_and_masks_on_held_out_images(tiny_mae_checkpoint, synthetic_coco, tmp_path, capsys):
    need("pycocotools")
    run = tmp_path / "det"
    args = ["detect", *TINY_DETECT, f"backbone.checkpoint={tiny_mae_checkpoint}", f"data.root={synthetic_coco}",
            "schedule.max_iters=200", f"output.dir={run}"]
    assert main(args) == 0
    metrics = json.loads((run / "eval.json").read_text())
    print(f"\ndetect on 32 held-out images after 200 iterations: box AP {metrics['bbox']}, mask AP {metrics['segm']}")
    assert metrics["iter"] == 200
    assert metrics["bbox"]["AP"] > 0.04 and metrics["bbox"]["AP50"] > 0.12
    assert metrics["segm"]["AP"] > 0.02
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert all(r["data_wait_ms"] >= 0 for r in records if "loss" in r)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000100", "step_00000200"]
    # the checkpoint holds the fine-tuned model: evaluating it again gives the same numbers
    assert main(["detect", *TINY_DETECT, f"backbone.checkpoint={tiny_mae_checkpoint}", f"data.root={synthetic_coco}",
                 "eval_only=true", "resume=auto", f"output.dir={run}"]) == 0
    again = json.loads((run / "eval.json").read_text())
    assert again["bbox"] == pytest.approx(metrics["bbox"]) and again["iter"] == 200


def test_detect_reports_bad_options_and_missing_data(tmp_path, capsys):
    assert main(["detect", "model.fpn_chanels=3", f"data.root={tmp_path}"]) == 2
    assert "did you mean 'fpn_channels'" in capsys.readouterr().err
    assert main(["detect", "backbone.name=mae_vit_tiny_patch16", f"data.root={tmp_path}",
                 f"output.dir={tmp_path / 'o'}"]) == 2
    assert "instances_train2017.json does not exist" in capsys.readouterr().err
    assert main(["detect", "backbone.name=mae_vit_tiny_patch16"]) == 2
    assert "data.root: required" in capsys.readouterr().err
