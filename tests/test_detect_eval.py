"""COCO evaluation and the detection data path (no training)."""

import dense_support
import pytest
import torch
from extras import need

from mimscale.downstream.detect import (
    CocoInstances,
    LargeScaleJitter,
    boxes_from_masks,
    coco_metrics,
)
from mimscale.downstream.detect.data import coco_paths
from mimscale.downstream.detect.evaluate import to_coco_results

synthetic_coco = dense_support.synthetic_coco


def _gt_as_results(coco, noise=0.0):
    out = []
    for a in coco.loadAnns(coco.getAnnIds()):
        x, y, w, h = a["bbox"]
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                    "bbox": [x + noise * w, y, w, h], "segmentation": coco.annToRLE(a)})
    return out


@pytest.mark.parametrize("split", ["train2017", "val2017"])  # polygons, compressed RLE
def test_ground_truth_against_itself_scores_ap_1(synthetic_coco, split):
    need("pycocotools")
    ds = CocoInstances(*coco_paths(synthetic_coco, split), train=False)
    metrics = coco_metrics(ds.coco, _gt_as_results(ds.coco))
    for iou_type in ("bbox", "segm"):
        stats = metrics[iou_type]
        assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
        assert stats["AP75"] == pytest.approx(1.0)
        assert all(v is None or v == pytest.approx(1.0) for v in stats.values())
        assert stats["APl"] is None  # 64 px images have no large objects: undefined, not 0
    shifted = coco_metrics(ds.coco, _gt_as_results(ds.coco, noise=0.3), iou_types=("bbox",))
    assert 0.0 < shifted["bbox"]["AP"] < 0.9  # boxes off by 30% of their width lose AP at high IoU
    assert coco_metrics(ds.coco, [])["bbox"]["AP"] == 0.0


def test_torchvision_outputs_become_coco_results_that_score_1(synthetic_coco):
    need("pycocotools")
    ds = CocoInstances(*coco_paths(synthetic_coco, "val2017"), train=False)
    results = []
    for i in range(len(ds)):
        _, t = ds[i]
        out = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
               "masks": t["masks"][:, None].float()}
        results += to_coco_results(out, t["image_id"], ds.cat_ids)
    m = coco_metrics(ds.coco, results)
    assert m["bbox"]["AP"] == pytest.approx(1.0) and m["segm"]["AP"] == pytest.approx(1.0)


def test_boxes_from_masks_are_tight_with_exclusive_edges():
    masks = torch.zeros(2, 10, 12, dtype=torch.uint8)
    masks[0, 2:5, 3:9] = 1
    masks[1, 0, 11] = 1
    assert boxes_from_masks(masks.bool()).tolist() == [[3, 2, 9, 5], [11, 0, 12, 1]]


def test_large_scale_jitter_gives_square_crops_with_consistent_targets(synthetic_coco):
    need("pycocotools")
    torch.manual_seed(0)
    ds = CocoInstances(*coco_paths(synthetic_coco, "train2017"), transform=LargeScaleJitter(48, (0.5, 2.0)))
    for i in range(8):
        image, t = ds[i]
        assert image.shape == (3, 48, 48) and t["masks"].shape[1:] == (48, 48)
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
        assert torch.equal(t["boxes"], boxes_from_masks(t["masks"].bool()))
        assert bool(t["masks"].flatten(1).any(1).all())  # objects cropped away are dropped
        assert (t["labels"] >= 1).all() and (t["labels"] <= 6).all()
