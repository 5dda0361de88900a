"""ADE20K-layout semantic segmentation data with the mmseg ADE20K training pipeline.

Layout (``ADEChallengeData2016``): ``<root>/images/<split>/<name>.jpg|png`` and
``<root>/annotations/<split>/<name>.png``, labels 0 = other, 1..K = classes. With
``reduce_zero_label`` label 0 becomes the ignore index 255 and every class moves down by one.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from mimscale.data_pipeline.pixels import to_rgb

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def ade_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """``(image, label)`` paths of a split, matched by file stem."""
    images_dir, labels_dir = Path(root) / "images" / split, Path(root) / "annotations" / split
    for p in (images_dir, labels_dir):
        if not p.is_dir():
            raise FileNotFoundError(f"ADE20K split {split!r}: {p} does not exist (expected "
                                    f"<root>/images/{split}/ and <root>/annotations/{split}/)")
    labels = {p.stem: p for p in labels_dir.iterdir() if p.suffix == ".png"}
    pairs = [(p, labels[p.stem]) for p in sorted(images_dir.iterdir())
             if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem in labels]
    if not pairs:
        raise FileNotFoundError(f"ADE20K split {split!r}: no image in {images_dir} has a label in {labels_dir}")
    return pairs


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE's 0 ("other") -> ignore (255); class k -> k-1."""
    out = label.astype(np.int64) - 1
    out[label == 0] = IGNORE_INDEX
    return out


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rule: the largest size with long side <= max(scale) and short side
    <= min(scale)."""
    r = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(1, int(h * r + 0.5)), max(1, int(w * r + 0.5))


class ADE20KSegmentation(Dataset):
    """``(image [3, H, W] float in [0, 1], label [H, W] int64)`` with the ignore index 255."""

    def __init__(self, root: str | Path, split: str, reduce_zero: bool = True, transform=None,
                 limit: int | None = None):
        self.pairs = ade_pairs(root, split)[:limit] if limit else ade_pairs(root, split)
        self.reduce_zero = reduce_zero
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image_path, label_path = self.pairs[index]
        with Image.open(image_path) as im:
            image = torch.from_numpy(np.asarray(to_rgb(im)).copy()).permute(2, 0, 1).float() / 255
        with Image.open(label_path) as lb:
            label = np.asarray(lb)
        label = torch.from_numpy(reduce_zero_label(label) if self.reduce_zero else label.astype(np.int64))
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image, label


class PhotoMetricDistortion:
    """mmseg's colour jitter, each part with probability 1/2: brightness ±32/255 (additive),
    contrast ×[0.5, 1.5] (before or after the rest), saturation ×[0.5, 1.5], hue ±18°."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if random.random() < 0.5:
            image = image + random.uniform(-32, 32) / 255
        contrast_first = random.random() < 0.5
        alpha = random.uniform(0.5, 1.5) if random.random() < 0.5 else None
        if contrast_first and alpha is not None:
            image = image * alpha
        image = image.clamp(0, 1)
        if random.random() < 0.5:
            image = TF.adjust_saturation(image, random.uniform(0.5, 1.5))
        if random.random() < 0.5:
            image = TF.adjust_hue(image, random.uniform(-18, 18) / 360)
        if not contrast_first and alpha is not None:
            image = image * alpha
        return image.clamp(0, 1)


class SegTrainTransform:
    """mmseg's ADE20K training pipeline: random resize (ratio range of the ``scale`` bound), a
    random crop whose largest class covers at most ``cat_max_ratio`` (10 tries), flip,
    photometric distortion, pad to the crop (labels padded with the ignore index)."""

    def __init__(self, crop: int, scale: tuple[int, int] = (2048, 512), ratio_range=(0.5, 2.0),
                 cat_max_ratio: float = 0.75, photometric: bool = True):
        self.crop, self.scale, self.ratio_range = crop, scale, ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.photometric = PhotoMetricDistortion() if photometric else None

    def _crop_box(self, label: torch.Tensor) -> tuple[int, int]:
        h, w = label.shape
        for _ in range(10):
            y0, x0 = random.randint(0, max(0, h - self.crop)), random.randint(0, max(0, w - self.crop))
            window = label[y0:y0 + self.crop, x0:x0 + self.crop]
            counts = torch.bincount(window[window != IGNORE_INDEX].flatten())
            if self.cat_max_ratio >= 1 or len(counts) < 2 or counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return y0, x0

    def __call__(self, image: torch.Tensor, label: torch.Tensor):
        r = random.uniform(*self.ratio_range)
        h, w = rescale_size(*image.shape[-2:], (round(self.scale[0] * r), round(self.scale[1] * r)))
        image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        y0, x0 = self._crop_box(label)
        image, label = image[:, y0:y0 + self.crop, x0:x0 + self.crop], label[y0:y0 + self.crop, x0:x0 + self.crop]
        if random.random() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        if self.photometric is not None:
            image = self.photometric(image)
        ph, pw = self.crop - image.shape[1], self.crop - image.shape[2]
        image = F.pad(image, (0, pw, 0, ph))
        label = F.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
        return image, label


def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*items)
    return torch.stack(images), torch.stack(labels)
