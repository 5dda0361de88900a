"""What every on-disk data set becomes: an indexable list of (image, label) with stable keys.

Why one shape for all of them: the training loop, the semi-supervised subsets and the feature
caches only need ``(image, label)`` by index, the class names, and a key per sample that a subset
file can name. Each data set's module only knows how to read its official layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from mimscale.data_pipeline.pixels import load_rgb
from mimscale.errors import UserError


class DatasetLayoutError(UserError, FileNotFoundError):
    """A data set's folder does not have the official layout; the message shows the layout."""

    def __init__(self, dataset: str, root: str | os.PathLike, problem: str, layout: str):
        super().__init__(f"{dataset} at {root}: {problem}\nexpected layout (the official one, "
                         f"unpacked as distributed):\n{layout.rstrip()}")


class LabeledImages(Dataset):
    """One split of a data set: ``ds[i] -> (transform(PIL RGB image), label)``.

    ``keys[i]`` names sample ``i`` stably (its path relative to the data set root, or
    ``<split>/<index>`` for array data sets); subset files list keys or their base names.
    """

    def __init__(self, name: str, split: str, classes: Sequence[str], keys: Sequence[str],
                 labels: Sequence[int], loader: Callable[[int], Image.Image],
                 transform: Callable | None = None):
        if len(keys) != len(labels):
            raise ValueError(f"{name} {split}: {len(keys)} samples but {len(labels)} labels")
        bad = [y for y in labels if not 0 <= y < len(classes)]
        if bad:
            raise ValueError(f"{name} {split}: label {bad[0]} outside [0, {len(classes)}) classes")
        self.name, self.split = name, split
        self.classes = list(classes)
        self.keys = list(keys)
        self.labels = [int(y) for y in labels]
        self._loader = loader
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.keys)

    def image(self, i: int) -> Image.Image:
        return self._loader(i)

    def __getitem__(self, i: int):
        img = self._loader(i)
        return (self.transform(img) if self.transform is not None else img), self.labels[i]

    def subset(self, indices: Sequence[int]) -> LabeledImages:
        """The same split restricted to ``indices`` (in that order); classes are kept."""
        idx = [int(i) for i in indices]
        return LabeledImages(self.name, self.split, self.classes, [self.keys[i] for i in idx],
                             [self.labels[i] for i in idx], lambda j: self._loader(idx[j]),
                             self.transform)


def file_images(name: str, split: str, root: Path, classes: Sequence[str],
                items: Sequence[tuple[str, int]]) -> LabeledImages:
    """Images stored as files: ``items`` are (path relative to ``root``, label)."""
    keys = [k for k, _ in items]

    def load(i: int) -> Image.Image:
        return load_rgb(root / keys[i])

    return LabeledImages(name, split, classes, keys, [y for _, y in items], load)


def unpacked(root: str | os.PathLike, top: str) -> Path:
    """``root/top`` when the official archive was unpacked into ``root`` with its own top folder
    (``CUB_200_2011/``, ``dtd/``, ...), else ``root`` itself."""
    root = Path(root)
    return root / top if (root / top).is_dir() else root


def require(dataset: str, root: Path, layout: str, *paths: str) -> None:
    """Raise :class:`DatasetLayoutError` naming the first of ``paths`` (relative to ``root``)
    that is missing."""
    if not root.is_dir():
        raise DatasetLayoutError(dataset, root, "the folder does not exist", layout)
    for p in paths:
        if not (root / p).exists():
            raise DatasetLayoutError(dataset, root, f"'{p}' is missing", layout)


def check_split(dataset: str, split: str, valid: Sequence[str]) -> None:
    if split not in valid:
        raise ValueError(f"{dataset}: split {split!r} is not one of its official splits; valid: "
                         f"{', '.join(valid)}")


def check_files(dataset: str, root: Path, layout: str, keys: Sequence[str], sample: int = 8) -> None:
    """Catch a wrong image folder early: the first few listed images must exist."""
    for k in list(keys)[:sample]:
        if not (root / k).is_file():
            raise DatasetLayoutError(dataset, root, f"listed image '{k}' is missing", layout)
