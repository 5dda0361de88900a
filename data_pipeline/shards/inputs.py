"""What a shard writer reads: an ImageFolder, or the synthetic generator.

An input is indexable: ``len()``, ``load(i) -> Item`` (raising when the file cannot be read),
``describe(i)`` for messages, and ``fingerprint()``, which a resumed write compares so it never
continues a different job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..build import imagefolder_root
from ..sources.imagefolder import ImageFolderSource
from ..synthetic import sample_at, sample_record


@dataclass
class Item:
    data: bytes | np.ndarray  # an encoded file, or raw uint8 [H, W, 3] pixels
    label: int = -1
    meta: dict = field(default_factory=dict)  # stored next to the image as ``<key>.json``


class ImageFolderInput:
    def __init__(self, root: str | os.PathLike):
        self.source = ImageFolderSource(imagefolder_root(root))

    def __len__(self) -> int:
        return len(self.source)

    def describe(self, i: int) -> str:
        return self.source.path(i)

    def load(self, i: int) -> Item:
        path, label = self.source.samples[i]
        with open(path, "rb") as f:
            data = f.read()
        return Item(data, label, {"path": os.path.relpath(path, self.source.root)})

    def fingerprint(self) -> dict:
        return {"input": "imagefolder", "root": str(self.source.root.resolve()), "count": len(self)}


class SyntheticInput:
    def __init__(self, num_images: int, size: int = 64, seed: int = 0, max_objects: int = 3,
                 min_objects: int = 1):
        self.num_images, self.size, self.seed = num_images, size, seed
        self.max_objects, self.min_objects = max_objects, min_objects

    def __len__(self) -> int:
        return self.num_images

    def describe(self, i: int) -> str:
        return f"synthetic sample {i}"

    def load(self, i: int) -> Item:
        s = sample_at(self.seed, i, self.size, self.max_objects, self.min_objects)
        return Item(s.image, s.label, sample_record(s, i))

    def fingerprint(self) -> dict:
        return {"input": "synthetic", "count": self.num_images, "size": self.size, "seed": self.seed,
                "max_objects": self.max_objects, "min_objects": self.min_objects}
