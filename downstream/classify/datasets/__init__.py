"""Classification data sets from their official on-disk layouts (nothing is downloaded).

``build_dataset(name, root, split)`` returns a :class:`LabeledImages`; a folder that does not have
the expected layout raises :class:`DatasetLayoutError` (a ``FileNotFoundError``) whose message
shows that layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from .annotated import cub200, dtd, flowers102, inaturalist, stanford_dogs
from .base import DatasetLayoutError, LabeledImages
from .cifar import cifar
from .folders import ensure_synthetic, imagenet, synthetic, tinyimagenet


@dataclass(frozen=True)
class DatasetInfo:
    reader: object       # (root, split, **options) -> LabeledImages
    train_split: str     # the official training split used by default
    eval_split: str      # the official split results are reported on
    splits: tuple[str, ...] = ("train", "val")


DATASETS: dict[str, DatasetInfo] = {
    "imagenet": DatasetInfo(imagenet, "train", "val"),
    "imagefolder": DatasetInfo(partial(imagenet, name="imagefolder"), "train", "val"),
    "inat2018": DatasetInfo(partial(inaturalist, year=2018), "train", "val"),
    "inat2019": DatasetInfo(partial(inaturalist, year=2019), "train", "val"),
    "flowers102": DatasetInfo(flowers102, "trainval", "test", ("train", "val", "test", "trainval")),
    "cub200": DatasetInfo(cub200, "train", "test", ("train", "test")),
    "stanford_dogs": DatasetInfo(stanford_dogs, "train", "test", ("train", "test")),
    "cifar10": DatasetInfo(partial(cifar, name="cifar10"), "train", "test", ("train", "test")),
    "cifar100": DatasetInfo(partial(cifar, name="cifar100"), "train", "test", ("train", "test")),
    "dtd": DatasetInfo(dtd, "trainval", "test", ("train", "val", "test", "trainval")),
    "tinyimagenet": DatasetInfo(tinyimagenet, "train", "val"),
    "synthetic": DatasetInfo(synthetic, "train", "val"),
}


def build_dataset(name: str, root, split: str, fold: int = 1) -> LabeledImages:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")
    options = {"fold": fold} if name == "dtd" else {}
    return DATASETS[name].reader(root, split, **options)


__all__ = ["DATASETS", "DatasetInfo", "DatasetLayoutError", "LabeledImages", "build_dataset",
           "cifar", "cub200", "dtd", "ensure_synthetic", "flowers102", "imagenet", "inaturalist",
           "stanford_dogs", "synthetic", "tinyimagenet"]
