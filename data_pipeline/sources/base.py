"""The contract every source keeps: encoded samples by global id, in the order asked for.

Why encoded bytes: decoding belongs to the shared view pipeline (``views.py``), which decodes only
what the crop needs; a source only knows where the bytes live. A sample that cannot be read is not
an exception but a :class:`Record` with ``error`` set, so the loader can skip, count and log it
without losing its place in the epoch.

A source has ``name``, ``shard_sizes`` (sample counts per shard, in file order; a map-style
source is one shard) and ``read(ids)``, which yields one ``Record`` per id, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class Record:
    id: int  # global sample id (see ``plan.EpochPlan``)
    where: str  # shard, file or folder it comes from
    key: str  # the sample's name inside ``where``
    data: bytes | None = None  # an encoded image (JPEG, PNG, ...) or raw RGB pixels (see ``shape``)
    label: int = -1  # -1 when the source has none
    shape: tuple[int, int] | None = None  # (height, width) when ``data`` is raw uint8 RGB
    error: str | None = None  # why the sample could not be read

    def describe(self) -> str:
        return f"{self.where} key {self.key}"


class Source(Protocol):
    name: str
    shard_sizes: list[int]

    def read(self, ids: np.ndarray): ...


def check_ids(ids, num_samples: int) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= num_samples):
        raise IndexError(f"sample ids must be in [0, {num_samples}), got {ids.min()}..{ids.max()}")
    return ids
