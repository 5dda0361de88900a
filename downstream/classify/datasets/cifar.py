"""CIFAR-10 / CIFAR-100 from their python pickle batches (the "python version" archives)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from .base import DatasetLayoutError, LabeledImages, check_split

_FORMATS = {
    "cifar10": dict(folder="cifar-10-batches-py", meta="batches.meta", names=b"label_names", labels=b"labels",
                    splits={"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}),
    "cifar100": dict(folder="cifar-100-python", meta="meta", names=b"fine_label_names", labels=b"fine_labels",
                     splits={"train": ["train"], "test": ["test"]}),
}


def _layout(name: str) -> str:
    f = _FORMATS[name]
    files = ", ".join(f["splits"]["train"] + f["splits"]["test"] + [f["meta"]])
    return (f"<root>/{f['folder']}/   (or <root> itself)\n  {files}    python pickles: "
            f"data (N x 3072 uint8, RGB planes), {f['labels'].decode()}; meta: {f['names'].decode()}")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")
    return {(k.encode() if isinstance(k, str) else k): v for k, v in raw.items()}


def cifar(root: str | os.PathLike, split: str, name: str = "cifar10") -> LabeledImages:
    fmt = _FORMATS[name]
    check_split(name, split, ("train", "test"))
    root = Path(root)
    folder = root / fmt["folder"] if (root / fmt["folder"]).is_dir() else root
    for f in fmt["splits"][split] + [fmt["meta"]]:
        if not (folder / f).is_file():
            raise DatasetLayoutError(name, root, f"'{fmt['folder']}/{f}' is missing", _layout(name))
    meta = _unpickle(folder / fmt["meta"])
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[fmt["names"]]]
    arrays, labels = [], []
    for f in fmt["splits"][split]:
        batch = _unpickle(folder / f)
        if b"data" not in batch or fmt["labels"] not in batch:
            raise DatasetLayoutError(name, root, f"{f} has no 'data' or '{fmt['labels'].decode()}'", _layout(name))
        arrays.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels += [int(y) for y in batch[fmt["labels"]]]
    pixels = np.concatenate(arrays).transpose(0, 2, 3, 1)  # N, H, W, C
    keys = [f"{split}/{i}" for i in range(len(labels))]
    return LabeledImages(name, split, classes, keys, labels, lambda i: Image.fromarray(pixels[i]))
