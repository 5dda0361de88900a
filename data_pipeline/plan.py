"""Which samples every (rank, worker) reads in an epoch, and in which order.

Why a pure function of ``(seed, epoch, layout)``: exactly-once splits and exact mid-epoch resume
both follow from it. No process ever needs to ask another what it read; a resume position is
two integers.

The epoch order is a two-level permutation (shards first, then the samples inside each shard), so
a reader streams whole runs of a shard instead of seeking all over the data set. It is cut to a
multiple of ``world_size * batch_size`` (``remainder``: ``drop`` the tail, or ``pad`` by repeating
its head) and split into one contiguous chunk per rank. Inside a rank, each of ``W`` loader
workers owns a contiguous piece of the chunk, and batches are emitted round-robin over workers
(the order ``torch.utils.data.DataLoader`` consumes them in), counted globally across epochs:
global batch ``k = epoch * steps_per_epoch + b`` comes from worker ``k % W``. The same split of
what is left of an epoch over another layout, after a resume, is ``resplit.py``'s.
"""

from __future__ import annotations

import numpy as np

from mimscale.errors import DataError

REMAINDERS = ("drop", "pad")
_SHARDS, _SAMPLES = 2, 3  # domain tags for mix_seed (0 and 1 are the loader's)


def mix_seed(*ints: int) -> int:
    """Well-mixed 63-bit seed from a tuple of non-negative ints (nearby tuples -> unrelated)."""
    return int(np.random.SeedSequence(list(ints)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def worker_batches(steps: int, phase: int, worker: int, num_workers: int) -> np.ndarray:
    """Which of a rank's ``steps`` batches logical ``worker`` emits, batches going round robin over
    ``num_workers`` workers and the first one being global batch ``phase``."""
    return np.arange((worker - phase) % num_workers, steps, num_workers)


def piece_starts(steps: int, phase: int, batch_size: int, num_workers: int) -> np.ndarray:
    """Where each worker's contiguous piece of a rank's chunk starts (``num_workers + 1`` offsets,
    the last one the chunk's length): each piece holds that worker's batches, in order."""
    counts = [len(worker_batches(steps, phase, w, num_workers)) for w in range(num_workers)]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64) * batch_size


def read_in_chunk(steps: int, phase: int, batch_size: int, num_workers: int, batches: int) -> np.ndarray:
    """Offsets (within a rank's chunk) of the samples of the rank's first ``batches`` batches."""
    starts = piece_starts(steps, phase, batch_size, num_workers)
    taken = [int(np.searchsorted(worker_batches(steps, phase, w, num_workers), batches)) for w in range(num_workers)]
    return np.concatenate([np.arange(starts[w], starts[w] + n * batch_size) for w, n in enumerate(taken)])


class EpochPlan:
    """The sample layout of every epoch for ``shard_sizes`` samples split over ``world_size`` ranks.

    Sample ids are global: shard ``s`` holds ids ``offsets[s] .. offsets[s] + shard_sizes[s] - 1``
    in file order. A map-style source is a single shard, which makes the order a plain
    permutation.
    """

    def __init__(self, shard_sizes, batch_size: int, seed: int = 0, world_size: int = 1,
                 remainder: str = "drop"):
        sizes = np.asarray(list(shard_sizes), dtype=np.int64)
        if sizes.ndim != 1 or len(sizes) == 0 or (sizes < 0).any():
            raise ValueError(f"shard sizes must be a non-empty list of counts >= 0, got {shard_sizes!r}")
        if remainder not in REMAINDERS:
            raise ValueError(f"remainder {remainder!r} is not valid; valid: {', '.join(REMAINDERS)}")
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size {batch_size} and world_size {world_size} must be >= 1")
        self.shard_sizes, self.batch_size, self.seed = sizes, batch_size, seed
        self.world_size, self.remainder = world_size, remainder
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.num_samples = int(self.offsets[-1])
        unit = world_size * batch_size
        if remainder == "drop":
            used = self.num_samples // unit * unit
        else:
            used = -(-self.num_samples // unit) * unit
        if used == 0:
            raise DataError(f"{self.num_samples} samples cannot fill one batch of {batch_size} on each "
                             f"of {world_size} rank(s) with remainder=drop; use remainder=pad, a "
                             "smaller batch or more data")
        self.samples_per_epoch = used  # over all ranks; differs from num_samples by the remainder
        self.per_rank = used // world_size
        self.steps_per_epoch = self.per_rank // batch_size

    # ------------------------------------------------------------------ whole epoch

    def order(self, epoch: int) -> np.ndarray:
        """Every sample id once: shards in a seeded order, each shard's samples permuted."""
        shards = np.random.default_rng(mix_seed(_SHARDS, self.seed, epoch)).permutation(len(self.shard_sizes))
        parts = [self.offsets[s] + np.random.default_rng(mix_seed(_SAMPLES, self.seed, epoch, int(s)))
                 .permutation(int(self.shard_sizes[s])) for s in shards]
        return np.concatenate(parts).astype(np.int64)

    def epoch_ids(self, epoch: int) -> np.ndarray:
        """The order cut (``drop``) or cyclically extended (``pad``) to ``samples_per_epoch``."""
        order = self.order(epoch)
        if self.samples_per_epoch <= len(order):
            return order[: self.samples_per_epoch]
        return np.resize(order, self.samples_per_epoch)  # repeats from the head

    def rank_slice(self, rank: int) -> slice:
        self._check_rank(rank)
        return slice(rank * self.per_rank, (rank + 1) * self.per_rank)

    # ------------------------------------------------------------------ workers

    def worker_batches(self, epoch: int, worker: int, num_workers: int) -> np.ndarray:
        """The rank batches (``b`` in ``[0, steps_per_epoch)``) that ``worker`` emits in ``epoch``."""
        s = self.steps_per_epoch
        return worker_batches(s, epoch * s, worker, self._workers(num_workers))

    def worker_piece(self, epoch: int, rank: int, worker: int, num_workers: int) -> slice:
        """Positions (within ``epoch_ids``) of ``worker``'s contiguous piece of ``rank``'s chunk."""
        w = self._workers(num_workers)
        if not 0 <= worker < w:
            raise ValueError(f"worker {worker} outside [0, {w})")
        s = self.steps_per_epoch
        starts = piece_starts(s, epoch * s, self.batch_size, w) + self.rank_slice(rank).start
        return slice(int(starts[worker]), int(starts[worker + 1]))

    def batch_positions(self, epoch: int, rank: int, batch: int, num_workers: int) -> slice:
        """Positions (within ``epoch_ids``) of rank batch ``batch``; the union over batches is the chunk."""
        w = self._workers(num_workers)
        worker = (epoch * self.steps_per_epoch + batch) % w
        j = int(np.searchsorted(self.worker_batches(epoch, worker, w), batch))
        start = self.worker_piece(epoch, rank, worker, w).start + j * self.batch_size
        return slice(start, start + self.batch_size)

    def worker_start(self, epoch: int, batch: int, worker: int, num_workers: int) -> int:
        """How many of its batches of ``epoch`` ``worker`` has emitted before rank batch ``batch``."""
        return int(np.searchsorted(self.worker_batches(epoch, worker, num_workers), batch))

    def _workers(self, num_workers: int) -> int:
        return max(1, int(num_workers))

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world_size {self.world_size}")
