"""A dependency-free ImageFolder: ``root/<class>/**/<image>``, classes = sorted sub-folders.

Why not torchvision's: we want clear errors for missing/empty folders, tolerate empty class
folders, and let the loader (not the source) decide what to do with undecodable files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from mimscale.errors import UserError

from ..pixels import load_rgb
from .base import Record, check_ids

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class NoImagesError(UserError, ValueError):
    """A folder with no images in class sub-folders: bad input (a ``ValueError`` for the callers
    that catch one)."""


class ImageFolderSource:
    """Indexable ``(PIL RGB image, label)`` pairs in a deterministic (sorted) order; as a loader
    source (``read``) it is one shard of encoded files."""

    name = "imagefolder"

    def __init__(self, root: str | os.PathLike, extensions: tuple[str, ...] = IMG_EXTENSIONS):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.classes = sorted(p.name for p in self.root.iterdir()
                              if p.is_dir() and not p.name.startswith("."))
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        exts = tuple(e.lower() for e in extensions)
        self.samples: list[tuple[str, int]] = [
            (str(p), label) for c, label in self.class_to_idx.items()
            for p in sorted((self.root / c).rglob("*"))
            if p.suffix.lower() in exts and p.is_file()]
        if not self.samples:
            raise NoImagesError(f"no images ({', '.join(exts)}) in class sub-folders of {self.root}")
        self.shard_sizes = [len(self.samples)]

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, i: int) -> str:
        return self.samples[i][0]

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        """Decode fully here so corrupt files fail at this call."""
        path, label = self.samples[i]
        return load_rgb(path), label

    def read(self, ids) -> Iterator[Record]:
        for i in check_ids(ids, len(self.samples)).tolist():
            path, label = self.samples[i]
            rec = Record(i, str(self.root), os.path.relpath(path, self.root), label=label)
            try:
                with open(path, "rb") as f:
                    rec.data = f.read()
                if not rec.data:
                    rec.error = "zero-byte file"
            except OSError as e:
                rec.error = f"unreadable file: {e}"
            yield rec
