"""The resumable, exactly-once pretraining loader shared by every source.

Why this shape: a preempted run that resumes mid-epoch must see exactly the batches (samples *and*
augmentations) an uninterrupted run would have seen next, and every rank must get the same number
of full batches so DDP never hangs. Hence:

* which samples each (rank, worker) reads, and in which order, is a pure function of
  ``(seed, epoch)`` and the layout (``plan.EpochPlan``); a resume position is
  ``(epoch, batch_in_epoch)`` and the layout, from which the rest of an epoch can also be split
  over another layout (``resplit.py``);
* each sample's augmentation is drawn from a generator seeded by ``(seed, epoch, position)``, so it
  does not depend on which process decodes it or on what was decoded before;
* a sample that cannot be read or decoded is replaced by a neighbour (the batch stays full),
  counted, and logged with its shard, key and the reason in words; too many in one epoch stop the
  run. The workers send what they skipped with each batch; the consuming process counts it (the
  count is part of ``state_dict``, so it survives a resume) and keeps the records for whoever
  writes the run's list (``take_bad_records``).

Workers ship uint8 views and the consumer's side normalises them: a batch crosses processes in
fresh shared memory that is zeroed and faulted in page by page, which for float32 pixels cost a
worker more than a quarter of its decode time; uint8 is a quarter of the bytes. For a CPU model
the main process writes the floats into memory backed by huge pages (``_host_batch``); for a GPU
model the uint8 batch is pinned, copied without blocking and normalised on the device, so the
training process spends no host time on pixels (on an H200, host normalisation of ViT-L batches
of 64 left every step waiting ~18 ms for its data).
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import random
import signal
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mimscale.errors import UserError

from .bad_samples import BadSample, decode_reason
from .gpu_decode import Deferred, collate_encoded, decode_batch, defer_views, device_ready
from .plan import EpochPlan, mix_seed
from .resplit import LAYOUT, rest_of_epoch
from .sources.imagefolder import ImageFolderSource
from .stage import staged
from .views import ViewSpec, decode_views, mae_views, normalize_uint8, normalize_uint8_on, views_at

log = logging.getLogger("mimscale.data")

_AUG = 1  # domain tag of augmentation seeds (plan.py uses others)
_KEPT_RECORDS = 100_000  # bad-sample records held for a consumer that never takes them


class BadDataError(UserError, RuntimeError):
    """Too many unreadable samples: the data, not the code, needs fixing."""


class EpochSampler:
    """Exactly-once sampler over ``num_samples`` indices for map-style datasets (e.g. evaluation):
    the rank's contiguous chunk of a per-epoch permutation seeded by ``(seed, epoch)``, the
    remainder dropped so every rank gets ``per_rank`` indices. ``set_epoch(epoch, start)`` starts
    iteration at offset ``start``."""

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 remainder: str = "drop"):
        self.plan = EpochPlan([num_samples], 1, seed, world_size, remainder)
        self.rank_range = self.plan.rank_slice(rank)
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.per_rank = self.plan.per_rank
        self.epoch, self.start = 0, 0

    def indices(self, epoch: int) -> torch.Tensor:
        return torch.from_numpy(self.plan.epoch_ids(epoch)[self.rank_range])

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch)[self.start:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


class _Stream(IterableDataset):
    """The batches one loader worker emits, from global batch ``k0`` on, forever.

    DataLoader worker ``i`` of a loader started at global batch ``k0`` emits batches
    ``k0 + i, k0 + i + W, ...``: logical worker ``(k0 + i) % W`` of the plan.
    """

    def __init__(self, loader: PretrainLoader, k0: int):
        self.source, self.plan, self.views = loader.source, loader.plan, loader.views
        self.rank, self.workers, self.seed = loader.rank, loader.logical_workers, loader.seed
        self.fast, self.k0, self.rest = loader.fast_decode, k0, loader.rest
        self.defer = loader.decode == "gpu"  # JPEGs: plan the views, the main process decodes
        self.resolution = loader.resolution

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        k = self.k0 + (info.id if info is not None else 0)
        last_good, size = None, self.plan.batch_size
        for epoch, worker, batches, positions, ids in self._shares(k):
            records = self.source.read(ids)
            for j, start in enumerate(range(0, len(ids), size)):
                chunk = [next(records) for _ in range(size)]
                out, last_good = self._batch(chunk, positions[start:start + size], epoch, last_good)
                yield {**out, "epoch": epoch, "batch": int(batches[j]), "worker": worker}

    def _shares(self, k: int) -> Iterator[tuple]:
        """(epoch, logical worker, batch numbers, augmentation positions, sample ids) of this
        worker's share of each epoch from global batch ``k`` on; in the rest of an epoch split
        again after a resume (``resplit.py``), ``k`` counts its batches and the stream ends with it."""
        if self.rest is not None:
            worker, batches, idx = self.rest.share(self.rank, k, self.workers)
            yield self.rest.epoch, worker, batches, self.rest.aug[idx], self.rest.ids[idx]
            return
        worker, steps = k % self.workers, self.plan.steps_per_epoch
        epoch, batch = divmod(k, steps)
        skip = self.plan.worker_start(epoch, batch, worker, self.workers)
        while True:
            piece = self.plan.worker_piece(epoch, self.rank, worker, self.workers)
            batches = self.plan.worker_batches(epoch, worker, self.workers)[skip:]
            positions = np.arange(piece.start, piece.stop)[skip * self.plan.batch_size:]
            yield epoch, worker, batches, positions, self.plan.epoch_ids(epoch)[positions]
            epoch, skip = epoch + 1, 0

    def _decode(self, rec, epoch: int, position: int):
        if rec.error is not None:
            return None, BadSample(rec.where, rec.key, rec.error)
        rng = random.Random(mix_seed(_AUG, self.seed, epoch, int(position)))
        try:
            views = views_at(self.views, self.resolution, epoch)
            deferred = defer_views(rec.data, views, rng, rec.shape) if self.defer else None
            return deferred or decode_views(rec.data, views, rng, rec.shape, self.fast), None
        except Exception as e:  # noqa: BLE001 - any decode failure is a bad sample
            return None, BadSample(rec.where, rec.key, decode_reason(rec.data, e))

    def _batch(self, records, positions, epoch: int, last_good):
        decoded, bad = [], []
        for rec, pos in zip(records, positions):
            views, err = self._decode(rec, epoch, pos)
            decoded.append((rec, views))
            if err:
                bad.append(err)
        good = [d for d in decoded if d[1] is not None]
        if not good and last_good is None:
            raise BadDataError("no readable sample to stand in for the bad ones at the start of a "
                               "worker's share: " + "; ".join(map(str, bad)))
        filled, prev = [], last_good
        for i, item in enumerate(decoded):
            if item[1] is None:  # the previous good sample, else the next one in this batch
                item = prev or next(d for d in decoded[i:] if d[1] is not None)
            filled.append(item)
            prev = item
        return _collate(filled, len(self.views), bad), prev


def _uint8_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """The images stacked into a ``[B, 3, H, W]`` uint8 tensor; in a loader worker, allocated in
    shared memory, so handing it to the main process copies nothing (as torch's default collate)."""
    out = _shared_uint8((len(images), *images[0].shape))
    for dst, src in zip(out, images):
        dst.copy_(src)
    return out


_HUGE_PAGE = 2 << 20


def _host_batch(shape) -> torch.Tensor:
    """Fresh float32 memory for a normalised batch: when larger than a huge page, memory advised to
    use transparent huge pages (Linux), because faulting in a 38 MB batch (64 x 224^2) 4 KiB at a
    time costs several times normalising it."""
    nbytes = math.prod(shape) * 4
    if nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # no transparent huge pages: ordinary ones, still correct
        buf.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buf, dtype=torch.float32).view(shape)


def _normalize_views(batch: dict, device: torch.device) -> dict:
    """The worker's uint8 ``views`` -> normalised float32 ``images`` (and ``views`` if several),
    on ``device``."""
    if device.type == "cpu":
        views = [normalize_uint8(v, _host_batch(v.shape)) for v in batch.pop("views")]
    else:
        views = [normalize_uint8_on(v, device) for v in batch.pop("views")]
    batch["images"] = views[0]
    if len(views) > 1:
        batch["views"] = views
    return batch


def _shared_uint8(shape) -> torch.Tensor:
    """An empty uint8 tensor; in a loader worker, in shared memory (handing it over copies nothing)."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if get_worker_info() is None or new_shared is None:
        return torch.empty(shape, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(new_shared(math.prod(shape)), 0, shape)


def _collate(items, num_views: int, bad: list[BadSample]) -> dict:
    samples = [v for _, v in items]
    pixels = (collate_encoded(samples, num_views, _shared_uint8) if any(isinstance(v, Deferred) for v in samples)
              else {"views": [_uint8_batch([v.images[j] for v in samples]) for j in range(num_views)]})
    if "jpeg" in pixels:  # a sample the device fails to decode is named by its shard and key
        pixels["sources"] = [(r.where, r.key) for r, _ in items]
    out = {
        **pixels,
        "boxes": torch.tensor([v.boxes for _, v in items], dtype=torch.float32),
        "flips": torch.tensor([v.flips for _, v in items], dtype=torch.bool),
        "sizes": torch.tensor([v.original_size for _, v in items], dtype=torch.long),
        "index": torch.tensor([r.id for r, _ in items], dtype=torch.long),
        "labels": torch.tensor([r.label for r, _ in items], dtype=torch.long),
        "bad": bad,
    }
    return out


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # N workers x all cores of intra-op threads would oversubscribe
    # A scheduler may signal every process of a job (SLURM's --signal): preemption is the train
    # loop's business; a worker killed by SIGUSR1/2's default action would crash the run instead.
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


class PretrainLoader:
    """Infinite iterator of batches across epochs, from any source (see ``sources/base.py``).

    A batch: ``images`` float32 ``[B, 3, S, S]`` normalised, on ``device`` (the first view);
    ``views`` (the list of all views, when there are several); ``boxes`` ``[B, V, 4]`` crop boxes
    ``(x0, y0, x1, y1)`` in original pixels; ``flips`` ``[B, V]``; ``sizes`` ``[B, 2]`` original
    ``(height, width)``; ``index`` ``[B]`` sample ids (a stand-in's id where a sample was bad);
    ``labels`` ``[B]`` (-1 if unknown); ``epoch``, ``batch`` (in the epoch) and ``worker``.

    Every rank yields ``steps_per_epoch`` full batches per epoch. ``state_dict()`` is the position
    of the next batch; after ``load_state_dict`` the next (or current) iteration continues from
    exactly there. A position written under other ranks, workers or batch size continues with the
    samples of its epoch not read yet, split over this layout (``resplit.py``: every rank yields
    as many batches, which may differ from ``steps_per_epoch``), then the next epoch as usual;
    only other data (another sample count) goes on from the start of the next epoch, with a warning.
    ``resolution``: ``(first epoch, size)`` phases; an epoch's views are made at its phase's size
    (``schedule.resolution``). ``stage``: where a batch is put on the device: ``main`` (the thread
    that iterates) or ``thread`` (a background thread a batch ahead, ``stage.py``); the batches are
    the same either way.
    """

    def __init__(self, source, views: Sequence[ViewSpec], batch_size: int, seed: int = 0,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 remainder: str = "drop", max_bad_fraction: float = 0.01, fast_decode: bool = True,
                 device: torch.device | str = "cpu", decode: str = "cpu", resolution=(),
                 prefetch_factor: int = 2, pin_memory: str = "main", stage: str = "main"):
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction {max_bad_fraction} must be in [0, 1]")
        if decode not in ("cpu", "gpu") or (decode == "gpu" and not device_ready(views)):
            raise ValueError(f"decode {decode!r}: 'cpu', or 'gpu' for views of random crops and flips only")
        self.decode = decode  # gpu: JPEGs are decoded in this process, on ``device`` (gpu_decode.py)
        self.resolution = tuple((int(e), int(s)) for e, s in resolution)  # (first epoch, view size) phases
        self.source, self.views, self.seed = source, tuple(views), seed
        self.plan = EpochPlan(source.shard_sizes, batch_size, seed, world_size, remainder)
        self.plan.rank_slice(rank)  # validates rank
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.logical_workers = num_workers, max(1, num_workers)
        self.max_bad_fraction, self.fast_decode = max_bad_fraction, fast_decode
        self.device = torch.device(device)
        if prefetch_factor < 1 or pin_memory not in ("main", "thread"):
            raise ValueError(f"prefetch_factor {prefetch_factor} must be >= 1 and pin_memory 'main' or "
                             f"'thread', got {pin_memory!r}")
        # thread: DataLoader's pin thread pins each batch beside the step; the copy to the device then
        # finds it pinned (pin_memory() of a pinned tensor is the tensor) instead of pinning it itself
        self.prefetch_factor, self.pin_thread = prefetch_factor, pin_memory == "thread" and self.device.type == "cuda"
        if stage not in ("main", "thread"):
            raise ValueError(f"stage {stage!r}: 'main' or 'thread'")
        self.stage_thread = stage == "thread"  # decode / pin / copy / normalise in a thread (stage.py)
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.epoch, self.batch_in_epoch = 0, 0
        self.rest, self.earlier = None, []  # a resplit rest of the epoch, and the stretches before it
        self.stats = {"bad_samples": 0, "bad_in_epoch": 0, "last_bad": None}
        self._bad_records: deque[dict] = deque(maxlen=_KEPT_RECORDS)
        self._generation = 0  # bumped by load_state_dict to restart a live iterator

    def _layout(self) -> dict:
        return {"world_size": self.world_size, "workers": self.logical_workers,
                "batch_size": self.batch_size, "num_samples": self.plan.num_samples,
                "remainder": self.plan.remainder}

    def state_dict(self) -> dict:
        """The position of the next batch: ``batch_in_epoch`` counts in the current stretch (the
        rest of a resplit epoch has its own count, ``earlier`` lists the stretches before it)."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "bad_in_epoch": self.stats["bad_in_epoch"], "bad_samples": self.stats["bad_samples"],
                "earlier": list(self.earlier), **self._layout()}

    def _steps(self) -> int:
        """Batches per rank in the current stretch of the epoch."""
        return self.rest.steps if self.rest is not None else self.steps_per_epoch

    def load_state_dict(self, sd: dict) -> None:
        if sd["seed"] != self.seed:
            raise ValueError(f"state seed {sd['seed']} != loader seed {self.seed}")
        epoch, batch = int(sd["epoch"]), int(sd["batch_in_epoch"])
        earlier = [dict(part) for part in sd.get("earlier", [])]
        was = {k: sd.get(k, v) for k, v in self._layout().items()}
        changed = ", ".join(f"{k} {was[k]} -> {v}" for k, v in self._layout().items() if was[k] != v)
        resplit = False
        if (batch or earlier) and was["num_samples"] != self.plan.num_samples:
            log.warning("data: the data changed since the checkpoint (%s); an exact mid-epoch resume "
                        "is impossible, so the run continues at the start of epoch %d", changed, epoch + 1)
            epoch, batch, earlier = epoch + 1, 0, []
        elif (batch or earlier) and changed:
            if batch:
                earlier.append({**{k: was[k] for k in LAYOUT}, "batches": batch})
            batch, resplit = 0, True
        self.rest = rest_of_epoch(self.plan, epoch, earlier) if earlier else None
        if resplit:  # a warning, to be seen: batches per epoch differ until the next epoch
            log.warning("data: the layout changed since the checkpoint (%s); the samples of epoch %d "
                        "not read yet are split over the new one: %d batches a rank, then epoch %d",
                        changed, epoch, self.rest.steps if self.rest else 0, epoch + 1)
        if earlier and self.rest is None:  # nothing left that fills a batch on every rank
            epoch, batch, earlier = epoch + 1, 0, []
        self.earlier = earlier
        if not 0 <= batch < self._steps():
            raise ValueError(f"batch_in_epoch {batch} outside [0, {self._steps()}) for this loader")
        self.epoch, self.batch_in_epoch = epoch, batch
        self.stats["bad_in_epoch"] = int(sd.get("bad_in_epoch", 0)) if batch or earlier else 0
        self.stats["bad_samples"] = int(sd.get("bad_samples", 0))  # this rank's, since the run began
        self._generation += 1

    def _batches(self, k0: int) -> Iterator[dict]:
        stream = _Stream(self, k0)
        if self.num_workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                               worker_init_fn=_worker_init, prefetch_factor=self.prefetch_factor,
                               pin_memory=self.pin_thread,
                               # own generator: DataLoader would otherwise draw from the global RNG
                               generator=torch.Generator().manual_seed(self.seed)))

    def __iter__(self) -> Iterator[dict]:
        while True:
            gen = self._generation
            start = self.batch_in_epoch + (0 if self.rest is not None else self.epoch * self.steps_per_epoch)
            # a rest's stream ends with it: rebuilt for the next epoch
            batches = staged(self._batches(start), self._to_device, self.device, self.stage_thread)
            try:
                for batch in batches:
                    if gen != self._generation:
                        break  # state was loaded mid-iteration: rebuild from the new position
                    if (batch["epoch"], batch["batch"]) != (self.epoch, self.batch_in_epoch):
                        raise RuntimeError(f"data order broken: got batch {batch['batch']} of epoch "
                                           f"{batch['epoch']}, expected {self.batch_in_epoch} of {self.epoch}")
                    self._account(batch.pop("bad"))  # the workers' and the device's: they count in this epoch
                    self.batch_in_epoch += 1
                    if self.batch_in_epoch == self._steps():
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                        self.rest, self.earlier = None, []
                        self.stats["bad_in_epoch"] = 0
                    yield batch
            finally:
                batches.close()

    def _to_device(self, batch: dict) -> dict:
        """The worker's batch with its views decoded (``decode=gpu``) or normalised on the device;
        samples the device failed to decode join the batch's ``bad`` list. Reads no loader state,
        so it may run in the staging thread (``data.stage``)."""
        if "jpeg" not in batch:
            return _normalize_views(batch, self.device)
        views, failed = decode_batch(batch, views_at(self.views, self.resolution, batch["epoch"]), self.device)
        sources = batch.pop("sources")
        batch["bad"] = batch["bad"] + [BadSample(*sources[row], reason) for row, reason in failed]
        batch["images"] = views[0]
        if len(views) > 1:
            batch["views"] = views
        return batch

    def take_bad_records(self) -> list[dict]:
        """The bad samples of the batches yielded since the last call (``rank``, ``epoch``,
        ``batch``, ``shard``, ``key``, ``reason`` each), handed over once."""
        out = list(self._bad_records)
        self._bad_records.clear()
        return out

    def _account(self, bad: list[BadSample]) -> None:
        if not bad:
            return
        for b in bad:
            log.warning("data: skipped a bad sample, %s", b)
            self._bad_records.append({"rank": self.rank, "epoch": self.epoch, "batch": self.batch_in_epoch,
                                      "shard": b.shard, "key": b.key, "reason": b.reason})
        self.stats["bad_samples"] += len(bad)
        self.stats["bad_in_epoch"] += len(bad)
        self.stats["last_bad"] = str(bad[-1])
        limit = self.max_bad_fraction * self.plan.per_rank
        if self.stats["bad_in_epoch"] > limit:
            raise BadDataError(
                f"{self.stats['bad_in_epoch']} bad samples in epoch {self.epoch} on rank {self.rank}, "
                f"more than data.max_bad_fraction={self.max_bad_fraction:g} of its {self.plan.per_rank} "
                f"samples; last: {bad[-1]}")


def build_pretrain_loader(root: str | os.PathLike, img_size: int, batch_size: int, seed: int = 0,
                          num_workers: int = 0, crop_scale: tuple[float, float] = (0.2, 1.0),
                          hflip: bool = True, rank: int = 0, world_size: int = 1,
                          **kwargs) -> PretrainLoader:
    """ImageFolder at ``root`` + MAE's views -> ``PretrainLoader`` (``kwargs`` go to it)."""
    return PretrainLoader(ImageFolderSource(root), mae_views(img_size, crop_scale, hflip), batch_size,
                          seed, num_workers, rank, world_size, **kwargs)
