"""Write an FFCV ``.beton``: an ``image`` field (JPEG) and a ``label`` field, in ffcv's own format.

ffcv's writer decodes every image and stores it re-encoded (at most ``max_side``, at ``quality``),
and cannot append to a file. So the write goes to a temporary file that is renamed only when
complete (an interrupted write leaves nothing that looks finished, and a rerun starts over), and
inputs are checked first, in parallel, so that an unreadable one is skipped and reported instead
of stopping ffcv halfway.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

import numpy as np

from mimscale.errors import DataError

from ..sources.beton import import_ffcv
from .common import parallel_map, progress_bar, write_json, write_order
from .encode import decode_rgb, shrink

log = logging.getLogger("mimscale.data")


def _check(items, i: int):
    try:
        item = items.load(i)
        if not isinstance(item.data, np.ndarray):
            decode_rgb(item.data, max_side=64)  # reads every byte; cheap at a reduced DCT scale
        return None
    except Exception as e:  # noqa: BLE001 - reported and skipped
        return f"{type(e).__name__}: {e}"


class _Pairs:
    """``(image array, label)`` pairs in write order, as ffcv's writer indexes them."""

    def __init__(self, items, order, max_side):
        self.items, self.order, self.max_side = items, order, max_side

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j):
        item = self.items.load(int(self.order[j]))
        data = item.data
        if not isinstance(data, np.ndarray):
            data = np.asarray(shrink(decode_rgb(data, self.max_side), self.max_side))
        return data, max(item.label, 0)


def write_beton(items, out: str | os.PathLike, max_side: int | None = None, quality: int | None = None,
                shuffle: bool = True, seed: int = 0, workers: int = 0, progress: bool = True,
                overwrite: bool = False) -> Path:
    """Write ``items`` (``shards.inputs``) to the file ``out``; a ``<out>.json`` sidecar records
    the parameters and any skipped inputs. Labels below 0 (unknown) are stored as 0."""
    rgb_field, int_field = import_ffcv()
    from ffcv.writer import DatasetWriter

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    order = write_order(len(items), shuffle, seed)
    skipped, keep = [], []
    with progress_bar(len(order), 0, f"check {out.name}", progress) as advance:
        for position, (i, err) in enumerate(zip(order.tolist(), parallel_map(partial(_check, items),
                                                                               order.tolist(), workers))):
            advance()
            if err is None:
                keep.append(i)
            else:
                skipped.append({"position": position, "input": items.describe(i), "error": err})
                log.warning("skipped %s: %s", items.describe(i), err)
    if not keep:
        raise DataError(f"none of the {len(order)} inputs could be read; nothing to write")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fields = {"image": rgb_field(write_mode="jpg", max_resolution=max_side, jpeg_quality=quality or 90),
              "label": int_field()}
    try:
        DatasetWriter(str(tmp), fields, num_workers=max(1, workers)).from_indexed_dataset(
            _Pairs(items, np.asarray(keep), max_side))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(out.with_name(out.name + ".json"), {
        "params": {**items.fingerprint(), "format": "beton", "max_side": max_side, "quality": quality,
                   "shuffle": shuffle, "seed": seed},
        "nsamples": len(keep), "skipped": skipped})
    if skipped:
        log.warning("%d input(s) could not be read and were skipped (listed in %s.json)", len(skipped), out)
    return out

