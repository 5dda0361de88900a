"""The rest of an epoch, split again after a resume on another layout (ranks, loader workers or
batch size).

Why this can be exact: an epoch's order does not depend on the layout (``EpochPlan.order``), and
which positions of it every (rank, worker) had read after ``b`` batches follows from the layout
and ``b`` alone. So the samples of the epoch not read yet are known without asking any process:
they keep their epoch order, are cut to whole batches of the new layout (``drop`` or ``pad``, as
a whole epoch is) and split over the new ranks and workers as an epoch is; the next epoch starts as
usual. A checkpoint written during such a rest records the layouts before it (``earlier``), so a
second change of layout in the same epoch stays exact too.
"""

from __future__ import annotations

import numpy as np

from .plan import EpochPlan, piece_starts, read_in_chunk, worker_batches

LAYOUT = ("world_size", "workers", "batch_size", "remainder")  # what a rest may change


class Stretch:
    """Part of an epoch's order split over ranks (contiguous chunks) and each rank's loader workers
    (contiguous pieces; batches round robin over workers, the first one being global batch
    ``phase``).

    ``where`` holds positions in ``EpochPlan.order`` (which sample), ``aug`` the position that seeds
    each sample's augmentation (its position in the epoch's order, so a sample gets the views the
    uninterrupted run would have given it; a padding repeat gets a position of its own)."""

    def __init__(self, where: np.ndarray, aug: np.ndarray, world_size: int, batch_size: int, phase: int = 0):
        self.where, self.aug, self.phase = where, aug, phase
        self.world_size, self.batch_size = world_size, batch_size
        self.per_rank = len(where) // world_size
        self.steps = self.per_rank // batch_size
        self.epoch, self.ids = None, None  # set for a rest: its epoch and sample ids (order[where])

    @classmethod
    def whole_epoch(cls, plan: EpochPlan, epoch: int) -> Stretch:
        positions = np.arange(plan.samples_per_epoch)
        return cls(positions % plan.num_samples, positions, plan.world_size, plan.batch_size,
                   epoch * plan.steps_per_epoch)

    def read(self, batches: int, num_workers: int) -> np.ndarray:
        """``where`` of the samples every rank read in its first ``batches`` batches."""
        offsets = read_in_chunk(self.steps, self.phase, self.batch_size, max(1, num_workers), batches)
        ranks = np.arange(self.world_size)[:, None] * self.per_rank
        return self.where[(ranks + offsets[None, :]).ravel()]

    def share(self, rank: int, batch: int, num_workers: int) -> tuple[int, np.ndarray, np.ndarray]:
        """What the loader worker that emits rank batch ``batch`` reads from there on: (logical
        worker, its batch numbers, indices into ``where``/``aug`` of its samples in order)."""
        w = max(1, num_workers)
        worker = (self.phase + batch) % w
        batches = worker_batches(self.steps, self.phase, worker, w)
        skip = int(np.searchsorted(batches, batch))
        starts = piece_starts(self.steps, self.phase, self.batch_size, w) + rank * self.per_rank
        return worker, batches[skip:], np.arange(starts[worker] + skip * self.batch_size, starts[worker + 1])


def rest_of_epoch(plan: EpochPlan, epoch: int, earlier: list[dict]) -> Stretch | None:
    """The samples of ``epoch`` that the ``earlier`` stretches did not read, split over ``plan``'s
    layout; None when they do not fill one batch on every rank (``drop``) or none are left.

    ``earlier``: the epoch's stretches so far, in order, each a dict of its layout (``LAYOUT``) and
    ``batches``, how many batches each rank read of it; the first is the epoch as planned then.
    ``plan`` must describe the same data (shard sizes and seed)."""
    n = plan.num_samples
    seen = np.zeros(n, dtype=bool)
    for i, part in enumerate(earlier):
        if i == 0:
            old = EpochPlan(plan.shard_sizes, part["batch_size"], plan.seed, part["world_size"],
                            part["remainder"])
            stretch = Stretch.whole_epoch(old, epoch)
        else:
            stretch = _unseen(seen, part["world_size"], part["batch_size"], part["remainder"])
        if stretch is None or not 0 <= part["batches"] <= stretch.steps:
            raise ValueError(f"the data position names batch {part['batches']} of a stretch of epoch "
                             f"{epoch} that does not have it")
        seen[stretch.read(part["batches"], part["workers"])] = True
    rest = _unseen(seen, plan.world_size, plan.batch_size, plan.remainder)
    if rest is not None:
        rest.epoch, rest.ids = epoch, plan.order(epoch)[rest.where]
    return rest


def _unseen(seen: np.ndarray, world_size: int, batch_size: int, remainder: str) -> Stretch | None:
    left = np.flatnonzero(~seen)
    unit = world_size * batch_size
    used = len(left) // unit * unit if remainder == "drop" else -(-len(left) // unit) * unit
    if used == 0:
        return None
    where = np.resize(left, used)  # pad: repeats from the head of the rest
    aug = np.concatenate([left, len(seen) + np.arange(used - len(left))])[:used]
    return Stretch(where, aug, world_size, batch_size)
