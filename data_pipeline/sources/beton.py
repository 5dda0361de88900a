"""FFCV ``.beton`` files as a source: ffcv parses the file, our view pipeline decodes.

Why not ffcv's own loader: its decoders pick crops inside compiled code and report no geometry,
draw augmentation from a per-batch random state (no exact per-sample resume), and stop on a bad
image. Reading the stored JPEG bytes through ffcv's ``Reader`` and a memory map keeps every
source on one contract; ``mimscale bench data`` also times ffcv's native loader on the same file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from mimscale.errors import DataError, MissingExtraError

from .base import Record, check_ids

FFCV_HINT = ("reading or writing .beton files (data.source=ffcv, shards write --format beton) needs the ffcv package: pip install 'mimscale[ffcv]' (it builds "
             "against Debian's pkg-config libturbojpeg0-dev libopencv-dev: apt-get install them first)")


def import_ffcv():
    try:
        import ffcv.reader  # noqa: F401
        from ffcv.fields import IntField, RGBImageField
    except ImportError as e:
        raise MissingExtraError(f"{FFCV_HINT} ({e})") from None
    return RGBImageField, IntField


_JPG, _RAW = 0, 1  # ffcv's RGBImageField storage modes


class BetonSource:
    """Random access to the images (and integer labels) of a ``.beton`` written by ffcv."""

    name = "ffcv"

    def __init__(self, path: str | os.PathLike, image_field: str | None = None,
                 label_field: str | None = "label"):
        rgb_field, int_field = import_ffcv()
        from ffcv.reader import Reader

        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"data.urls: .beton file {self.path} does not exist")
        try:
            reader = Reader(self.path)
        except Exception as e:  # noqa: BLE001 - ffcv raises assorted errors on a bad header
            raise DataError(f"{self.path} is not a readable .beton file: {e}") from None
        images = [n for n, h in reader.handlers.items() if isinstance(h, rgb_field)]
        if image_field is None:
            image_field = "image" if "image" in images else (images[0] if images else None)
        if image_field not in images:
            raise DataError(f"{self.path}: no RGB image field {image_field or ''!r}; its fields are "
                             f"{', '.join(f'{n} ({type(h).__name__})' for n, h in reader.handlers.items())}")
        names = reader.field_names
        self.image = reader.metadata[f"f{names.index(image_field)}"].copy()
        has_label = label_field in names and isinstance(reader.handlers[label_field], int_field)
        self.labels = (reader.metadata[f"f{names.index(label_field)}"].astype(np.int64) if has_label
                       else np.full(len(self.image), -1, np.int64))
        table = np.sort(reader.alloc_table, order="ptr")
        self._ptrs, self._sizes = table["ptr"].astype(np.int64), table["size"].astype(np.int64)
        self.shard_sizes = [len(self.image)]
        self._file_size = os.path.getsize(self.path)
        self._map = None  # opened lazily, per process (a memmap does not survive pickling to workers)

    def __len__(self) -> int:
        return len(self.image)

    def __getstate__(self):
        return {**self.__dict__, "_map": None}

    def read(self, ids) -> Iterator[Record]:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        for i in check_ids(ids, len(self)).tolist():
            mode, width, height, ptr = (int(self.image[i][k]) for k in ("mode", "width", "height", "data_ptr"))
            rec = Record(i, self.path, f"sample {i}", label=int(self.labels[i]))
            j = int(np.searchsorted(self._ptrs, ptr))
            if j == len(self._ptrs) or self._ptrs[j] != ptr:
                rec.error = f"no allocation for the image at byte {ptr}"
            else:
                size = int(self._sizes[j])
                if ptr + size > self._file_size:
                    rec.error = f"truncated file: image bytes {ptr}..{ptr + size} past its end"
                elif size == 0:
                    rec.error = "zero-byte image"
                else:
                    rec.data = bytes(self._map[ptr:ptr + size])
                    if mode == _RAW:
                        rec.shape = (height, width)
            yield rec
