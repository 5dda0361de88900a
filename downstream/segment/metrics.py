"""Semantic segmentation metrics from a confusion matrix, as mmseg's IoUMetric computes them.

``mIoU`` and ``mAcc`` average over the classes that occur in the ground truth or the
predictions (a class absent from both has no IoU and is skipped, mmseg's nanmean); ``aAcc`` is
the fraction of labelled pixels predicted right.
"""

from __future__ import annotations

import torch

from mimscale.errors import DataError

from .data import IGNORE_INDEX


def check_labels(label: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
    """Raise a ``DataError`` naming ``data.num_classes`` when a label is outside ``0..K-1`` (other
    than the ignore index): cross-entropy would fail with an index error deep in a kernel."""
    labelled = label[label != ignore_index]
    out = (labelled < 0) | (labelled >= num_classes)
    if bool(out.any()):
        bad = labelled[out].unique().tolist()
        raise DataError(f"labels {bad[:8]} are outside 0..{num_classes - 1} (and not the ignore index "
                        f"{ignore_index}); check data.num_classes and data.reduce_zero_label")


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``[K, K]`` int64 counts, rows = ground truth, columns = prediction; ignored pixels skipped."""
    check_labels(label, num_classes, ignore_index)
    keep = label != ignore_index
    idx = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor) -> dict:
    """``{"mIoU", "mAcc", "aAcc"}`` as fractions, plus per-class ``IoU`` and ``Acc`` lists
    (``None`` where undefined)."""
    conf = conf.double()
    tp = conf.diag()
    gt, predicted = conf.sum(1), conf.sum(0)
    union = gt + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, float("nan")))
    total = conf.sum()

    def nanmean(v):
        v = v[~v.isnan()]
        return float(v.mean()) if v.numel() else 0.0

    return {"mIoU": nanmean(iou), "mAcc": nanmean(acc), "aAcc": float(tp.sum() / total) if total > 0 else 0.0,
            "IoU": [None if x != x else float(x) for x in iou.tolist()],
            "Acc": [None if x != x else float(x) for x in acc.tolist()]}


def majority_baseline(conf: torch.Tensor) -> dict:
    """The metrics of predicting the most frequent ground-truth class everywhere (a floor a
    trained model must beat)."""
    gt = conf.sum(1)
    k = int(gt.argmax())
    base = torch.zeros_like(conf)
    base[:, k] = gt
    return segmentation_metrics(base)
