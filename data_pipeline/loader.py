"""Resumable, deterministic pretraining loader.

Why: a preempted run that resumes mid-epoch must see exactly the batches (images *and*
augmentations) an uninterrupted run would have seen, for any ``num_workers``. Hence:

* the order is a pure function of ``(seed, epoch)`` (``EpochSampler``), and a resume position is
  just ``(epoch, batch_in_epoch)``;
* each sample's augmentation RNG is seeded from ``(seed, epoch, index)`` right before its
  transform, so it does not depend on which worker loads it or on what was loaded before.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from .sources.imagefolder import ImageFolderSource
from .transforms import mae_train_transform


def mix_seed(*ints: int) -> int:
    """Well-mixed 63-bit seed from a tuple of non-negative ints (nearby tuples -> unrelated)."""
    return int(np.random.SeedSequence(list(ints)).generate_state(1, np.uint64)[0] >> np.uint64(1))


_PERM, _AUG = 0, 1  # domain tags so permutation and augmentation seeds never coincide


class EpochSampler:
    """Per-epoch permutation seeded by ``(seed, epoch)``, sharded as ``perm[rank::world_size]``.

    The permutation is first truncated to a multiple of ``world_size`` so every rank gets the same
    number of samples (drop_last): up to ``world_size - 1`` random samples are skipped each epoch,
    a different set every epoch. ``set_epoch(epoch, start)`` starts iteration at offset ``start``.
    """

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.per_rank = num_samples // world_size
        self.epoch, self.start = 0, 0

    def indices(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(_PERM, self.seed, epoch))
        perm = torch.randperm(self.num_samples, generator=g)
        return perm[: self.per_rank * self.world_size][self.rank::self.world_size]

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch)[self.start:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


class _BatchesFrom:
    """Batch sampler: lists of ``(epoch, index)`` from a position onward, forever (full batches)."""

    def __init__(self, sampler: EpochSampler, batch_size: int, epoch: int, batch: int):
        self.sampler, self.batch_size, self.epoch, self.batch = sampler, batch_size, epoch, batch

    def __iter__(self):
        epoch, start, bs = self.epoch, self.batch, self.batch_size
        steps = self.sampler.per_rank // bs
        while True:
            idx = self.sampler.indices(epoch).tolist()
            for b in range(start, steps):
                yield [(epoch, i) for i in idx[b * bs:(b + 1) * bs]]
            epoch, start = epoch + 1, 0


class _AugmentedDataset:
    """Maps ``(epoch, index)`` to a transformed sample; replaces undecodable samples."""

    def __init__(self, source, transform: Callable, seed: int, max_skip: int = 64):
        self.source, self.transform, self.seed, self.max_skip = source, transform, seed, max_skip

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        n, bad = len(self.source), 0
        for j in range(index, index + min(n, self.max_skip)):
            j %= n
            try:
                img, label = self.source[j]
                break
            except Exception as e:  # noqa: BLE001 - any decode failure: take the next index
                name = self.source.path(j) if hasattr(self.source, "path") else f"index {j}"
                warnings.warn(f"skipping undecodable image {name}: {e!r}", stacklevel=2)
                bad += 1
        else:
            raise RuntimeError(f"{bad} consecutive undecodable samples from index {index}")
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            # Seeded by the requested index, so a replacement is not a copy of index j's own view.
            torch.manual_seed(mix_seed(_AUG, self.seed, epoch, index))
            x = self.transform(img)
        return x, label, j, epoch, bad


def _collate(items):
    xs, labels, idx, epochs, bad = zip(*items)
    return {"images": torch.stack(xs), "labels": torch.tensor(labels, dtype=torch.long),
            "index": torch.tensor(idx, dtype=torch.long), "epoch": int(epochs[0]),
            "bad_samples": sum(bad)}


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # N workers x all cores of intra-op threads would oversubscribe


class PretrainLoader:
    """Infinite iterator of batches ``{"images", "labels", "index", "epoch"}`` across epochs.

    ``index`` holds the dataset indices actually loaded (a replacement index where a sample was
    undecodable; ``stats["bad_samples"]`` counts those). Every rank yields ``steps_per_epoch``
    full batches per epoch; leftover samples are dropped. ``state_dict()`` is the position of the
    next batch to be yielded; after ``load_state_dict`` the next (or current) iteration continues
    from exactly there.
    """

    def __init__(self, source, transform: Callable, batch_size: int, seed: int = 0,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.sampler = EpochSampler(len(source), seed, rank, world_size)
        self.steps_per_epoch = self.sampler.per_rank // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(source)} samples over {world_size} rank(s) cannot fill one "
                             f"batch of {batch_size}")
        self.dataset = _AugmentedDataset(source, transform, seed)
        self.epoch, self.batch_in_epoch = 0, 0
        self.stats = {"bad_samples": 0}
        self._generation = 0  # bumped by load_state_dict to restart a live iterator

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed}

    def load_state_dict(self, sd: dict) -> None:
        if sd["seed"] != self.seed:
            raise ValueError(f"state seed {sd['seed']} != loader seed {self.seed}")
        if not 0 <= sd["batch_in_epoch"] < self.steps_per_epoch:
            raise ValueError(f"batch_in_epoch {sd['batch_in_epoch']} outside "
                             f"[0, {self.steps_per_epoch}) for this loader")
        self.epoch, self.batch_in_epoch = int(sd["epoch"]), int(sd["batch_in_epoch"])
        self._generation += 1

    def _dataloader(self) -> DataLoader:
        batches = _BatchesFrom(self.sampler, self.batch_size, self.epoch, self.batch_in_epoch)
        return DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                          collate_fn=_collate, pin_memory=self.pin_memory,
                          worker_init_fn=_worker_init if self.num_workers else None,
                          # own generator: DataLoader would otherwise draw from the global RNG
                          generator=torch.Generator().manual_seed(self.seed))

    def __iter__(self) -> Iterator[dict]:
        while True:
            gen = self._generation
            for batch in self._dataloader():
                if gen != self._generation:
                    break  # state was loaded mid-iteration: rebuild from the new position
                self.stats["bad_samples"] += batch.pop("bad_samples")
                self.batch_in_epoch += 1
                if self.batch_in_epoch == self.steps_per_epoch:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                yield batch


def build_pretrain_loader(root: str | os.PathLike, img_size: int, batch_size: int, seed: int = 0,
                          num_workers: int = 0, crop_scale: tuple[float, float] = (0.2, 1.0),
                          hflip: bool = True, rank: int = 0, world_size: int = 1,
                          pin_memory: bool = False) -> PretrainLoader:
    """ImageFolder at ``root`` + MAE train augmentation -> ``PretrainLoader``."""
    return PretrainLoader(ImageFolderSource(root), mae_train_transform(img_size, crop_scale, hflip),
                          batch_size, seed, num_workers, rank, world_size, pin_memory)
