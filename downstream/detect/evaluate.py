"""COCO evaluation with pycocotools: box and mask AP, AP50, AP75 and AP per object size."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


def coco_metrics(coco_gt, results: list[dict], iou_types=IOU_TYPES, image_ids=None) -> dict[str, dict]:
    """``{iou_type: {AP, AP50, AP75, APs, APm, APl}}`` as fractions in [0, 1]; a size with no
    ground truth object is ``None`` (pycocotools' -1), and no detections at all give 0."""
    from pycocotools.cocoeval import COCOeval

    out = {}
    for iou_type in iou_types:
        if not results:
            out[iou_type] = dict.fromkeys(STAT_NAMES, 0.0)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = coco_gt.loadRes([dict(r) for r in results])
            ev = COCOeval(coco_gt, dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = {k: (None if v < 0 else float(v)) for k, v in zip(STAT_NAMES, ev.stats[:6])}
    return out


def to_coco_results(output: dict, image_id: int, cat_ids: list[int], mask_threshold: float = 0.5) -> list[dict]:
    """One image's torchvision output (boxes xyxy, labels 1..K, scores, masks ``[n, 1, H, W]``
    probabilities, in original image coordinates) as COCO result records."""
    from pycocotools import mask as mask_utils

    boxes = output["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    labels, scores = output["labels"].tolist(), output["scores"].float().tolist()
    masks = (output["masks"][:, 0] > mask_threshold).cpu().numpy() if "masks" in output else None
    records = []
    for i, (box, label, score) in enumerate(zip(xywh, labels, scores)):
        rec = {"image_id": int(image_id), "category_id": int(cat_ids[label - 1]),
               "bbox": [round(v, 2) for v in box], "score": float(score)}
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[i].astype(np.uint8)))
            rec["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
        records.append(rec)
    return records


def format_metrics(metrics: dict[str, dict]) -> str:
    """A small table, in percent as papers report."""
    lines = ["        " + " ".join(f"{k:>6s}" for k in STAT_NAMES)]
    for iou_type, stats in metrics.items():
        cells = " ".join("     -" if v is None else f"{100 * v:6.2f}" for v in stats.values())
        lines.append(f"{iou_type:7s} {cells}")
    return "\n".join(lines)
