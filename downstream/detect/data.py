"""COCO instances for Mask R-CNN: images, boxes, labels and masks, with large-scale jitter.

Annotations are read with pycocotools, so polygons, uncompressed RLE and compressed RLE all work.
Category ids map to contiguous labels 1..K (0 is torchvision's background) in sorted id order.
"""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from mimscale.data_pipeline.pixels import to_rgb


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(annotation file, image folder)`` of a split in the COCO layout."""
    root = Path(root)
    ann, images = root / "annotations" / f"instances_{split}.json", root / split
    for p in (ann, images):
        if not p.exists():
            raise FileNotFoundError(f"COCO split {split!r}: {p} does not exist (expected "
                                    f"<root>/annotations/instances_{split}.json and <root>/{split}/)")
    return ann, images


def load_coco(ann_file: str | Path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return COCO(str(ann_file))


class CocoInstances(Dataset):
    """``(image [3, H, W] float in [0, 1], target)`` with ``target`` = boxes ``[n, 4]`` xyxy,
    labels ``[n]``, masks ``[n, H, W]`` uint8, image_id. Crowd regions are left out;
    ``train=True`` also skips images without objects (they carry no signal for Mask R-CNN)."""

    def __init__(self, ann_file: str | Path, image_dir: str | Path, transform=None, train: bool = True,
                 limit: int | None = None):
        self.coco = load_coco(ann_file)
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.cat_ids = sorted(self.coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        ids = sorted(self.coco.getImgIds())
        if train:
            ids = [i for i in ids if self._annotations(i)]
        self.ids = ids[:limit] if limit else ids

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def _annotations(self, image_id: int) -> list[dict]:
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False))
        return [a for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.loadImgs(image_id)[0]
        with Image.open(self.image_dir / info["file_name"]) as im:
            image = torch.from_numpy(np.asarray(to_rgb(im)).copy()).permute(2, 0, 1).float() / 255
        anns = self._annotations(image_id)
        h, w = image.shape[-2:]
        masks = (torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])) if anns
                 else torch.zeros(0, h, w, dtype=torch.uint8))
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        target = {"boxes": boxes, "labels": labels, "masks": masks, "image_id": image_id}
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (exclusive right/bottom edges, as COCO) of ``[n, H, W]`` masks."""
    if masks.shape[0] == 0:
        return torch.zeros(0, 4)
    rows, cols = masks.any(2), masks.any(1)
    h, w = masks.shape[-2:]
    ar_h, ar_w = torch.arange(h), torch.arange(w)
    y0 = torch.where(rows, ar_h, h).min(1).values
    y1 = torch.where(rows, ar_h, -1).max(1).values + 1
    x0 = torch.where(cols, ar_w, w).min(1).values
    x1 = torch.where(cols, ar_w, -1).max(1).values + 1
    return torch.stack([x0, y0, x1, y1], 1).float()


def _keep_visible(image, masks, labels, image_id):
    keep = masks.flatten(1).bool().any(1)
    masks, labels = masks[keep], labels[keep]
    return image, {"boxes": boxes_from_masks(masks.bool()), "labels": labels, "masks": masks,
                   "image_id": image_id}


class LargeScaleJitter:
    """LSJ (Ghiasi et al. 2021, ViTDet): resize so the long side is ``size × U(lo, hi)``, take a
    random ``size × size`` crop (or all of a smaller image), flip half the time, pad to
    ``size × size``. Boxes are recomputed from the transformed masks, so they stay exact."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.1, 2.0), flip: float = 0.5):
        self.size, self.scale, self.flip = size, scale, flip

    def __call__(self, image: torch.Tensor, target: dict):
        s = self.size
        h, w = image.shape[-2:]
        r = s * random.uniform(*self.scale) / max(h, w)
        nh, nw = max(1, round(h * r)), max(1, round(w * r))
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        masks = target["masks"]
        if masks.shape[0]:
            masks = F.interpolate(masks[None].float(), size=(nh, nw), mode="nearest")[0].to(torch.uint8)
        else:
            masks = masks.new_zeros(0, nh, nw)
        y0, x0 = random.randint(0, max(0, nh - s)), random.randint(0, max(0, nw - s))
        image, masks = image[:, y0:y0 + s, x0:x0 + s], masks[:, y0:y0 + s, x0:x0 + s]
        if random.random() < self.flip:
            image, masks = image.flip(-1), masks.flip(-1)
        ph, pw = s - image.shape[1], s - image.shape[2]
        image, masks = F.pad(image, (0, pw, 0, ph)), F.pad(masks, (0, pw, 0, ph))
        return _keep_visible(image, masks, target["labels"], target["image_id"])


class RandomFlip:
    """Horizontal flip only; the multi-scale resize happens inside the model's transform."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict):
        if random.random() < self.p:
            image, masks = image.flip(-1), target["masks"].flip(-1)
            return _keep_visible(image, masks, target["labels"], target["image_id"])
        return image, target


def collate(items: list) -> tuple[list, list]:
    images, targets = zip(*items)
    return list(images), list(targets)
