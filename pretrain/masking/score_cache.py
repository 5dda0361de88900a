"""The score cache (``masking.score_cache.every_epochs=K``, [X]): guided masking at random masking's cost.

Why: GPA, IDM and ccMIM pay for every mask with a no-grad pass of their scoring network over the
view. When that network is frozen or moves slowly (a frozen or EMA teacher, the momentum encoder),
a score map of the whole image computed now is nearly the one it would give K epochs later. So every
K epochs one no-grad pass over the data set writes each sample's full-image score maps (fp16, per
head where the strategy picks heads); at train time a view's maps are cut out of them with the view's
geometry (crop box and flip, RoIAlign onto the view's patch grid) and handed to the same selectors.
A frozen teacher's scores never change, so its cache is computed once and never refreshed.

Layout beside the run (``<output.dir>/score_cache/``): each rank scores a contiguous range of sample
ids into ``e<epoch>-r<rank>.npy`` (written under a temporary name, then renamed), and after a barrier
rank 0 commits ``cache.json`` (also by rename), which lists the valid generations, the newest two.
Every rank memory-maps all shards of a generation (any rank may train on any sample). A resumed run
reads ``cache.json``: a generation that is due and listed is reused, one that is due and missing is
recomputed; a crash mid-refresh leaves the old ``cache.json`` and stray files that the next refresh
overwrites.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mimscale.config import ConfigError

CACHEABLE = ("gpa", "idm", "ccmim")  # strategies whose score is a function of the whole image
META = "cache.json"
KEEP = 2  # generations kept: a resume from a checkpoint one refresh behind still finds its own
FP16_MAX = 65504.0


def check_cacheable(strategy: str, source: str | None) -> None:
    """One-line ConfigError for a strategy whose score cannot come from the cache."""
    if strategy not in CACHEABLE or source not in ("teacher", "student"):
        why = "its masks need no score" if strategy in ("random", "block") else "its score is per view"
        raise ConfigError(f"masking.score_cache.every_epochs: strategy {strategy} cannot use the score cache "
                          f"({why}); it supports {', '.join(CACHEABLE)} scored by a network")


def warp(maps: torch.Tensor, boxes: torch.Tensor, sizes: torch.Tensor, flips: torch.Tensor,
         grid: tuple[int, int]) -> torch.Tensor:
    """Full-image score maps ``[B, C, gh, gw]`` -> each view's ``[B, C, N]`` on its patch grid ``grid``.

    ``boxes`` ``[B, 4]`` are the views' crops ``(x0, y0, x1, y1)`` in original pixels of images of
    ``sizes`` ``[B, 2]`` ``(height, width)``; ``flips`` ``[B]``. RoIAlign with pixel-centre alignment
    and adaptive sampling: the whole-image box returns the maps unchanged, a smaller one interpolates
    bilinearly, a larger-than-a-cell bin averages."""
    from torchvision.ops import roi_align

    b, _, gh, gw = maps.shape
    device = maps.device
    boxes, sizes = boxes.to(device, torch.float32), sizes.to(device, torch.float32)
    cells = torch.tensor([gw, gh, gw, gh], device=device, dtype=torch.float32)
    extent = sizes.flip(1).repeat(1, 2)  # (w, h, w, h): original px -> cells, exact for whole boxes
    rois = torch.cat([torch.arange(b, device=device, dtype=torch.float32)[:, None], boxes * cells / extent], dim=1)
    out = roi_align(maps.float(), rois, output_size=grid, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    out = torch.where(flips.to(device).view(-1, 1, 1, 1), out.flip(-1), out)
    return out.flatten(2)


@dataclass
class CachedBatch:
    """A batch's full-image maps (on the device) and its first view's geometry, warped on demand
    (inside ``make_mask``, so the logged mask time is warp + select)."""
    maps: torch.Tensor      # [B, C, gh, gw] fp16
    boxes: torch.Tensor     # [B, 4]
    sizes: torch.Tensor     # [B, 2]
    flips: torch.Tensor     # [B]

    def warp(self, grid: tuple[int, int]) -> torch.Tensor:
        return warp(self.maps, self.boxes, self.sizes, self.flips, grid)


class ScoreCache:
    """One run's cache: refresh when due (collective), look up a batch (local).

    ``signature`` names what the maps are (strategy, options, scoring network, image size): a cache
    written for anything else is never reused."""

    def __init__(self, folder: Path, every: int, frozen: bool, signature: dict, num_samples: int,
                 maps_shape: tuple[int, int, int], rank: int = 0, world_size: int = 1):
        self.folder, self.every, self.frozen = Path(folder), every, frozen
        self.signature, self.num_samples, self.shape = signature, num_samples, tuple(maps_shape)
        self.rank, self.world_size = rank, world_size
        self.folder.mkdir(parents=True, exist_ok=True)
        self.epoch: int | None = None  # the generation memory-mapped now
        self._shards: list[tuple[int, int, np.ndarray]] = []
        self.refreshes = 0  # passes this process ran (tests, logs)
        self.reuse = True  # whether generations already on disk may be read before this run writes one

    # ------------------------------------------------------------------ generations

    def due_epoch(self, epoch: int) -> int:
        """The generation training epoch ``epoch`` reads: the last refresh epoch (0 for a frozen source)."""
        return 0 if self.frozen else epoch // self.every * self.every

    def read_meta(self) -> dict | None:
        """``cache.json`` if it describes this cache (same signature, samples and map shape)."""
        path = self.folder / META
        if not path.is_file():
            return None
        meta = json.loads(path.read_text())
        same = (meta.get("signature") == self.signature and meta.get("num_samples") == self.num_samples
                and tuple(meta.get("shape", ())) == self.shape)
        return meta if same else None

    def ranges(self, world_size: int | None = None) -> list[tuple[int, int]]:
        """Contiguous sample-id ranges, one per rank."""
        w = world_size or self.world_size
        per = -(-self.num_samples // w)
        return [(min(r * per, self.num_samples), min((r + 1) * per, self.num_samples)) for r in range(w)]

    def ensure(self, epoch: int, score_fn, read_fn, barrier) -> bool:
        """Make generation ``due_epoch(epoch)`` the mapped one, computing it if no valid one is on
        disk. Collective when it computes (every rank decides alike from the shared ``cache.json``).
        ``score_fn(images) -> [b, C, gh, gw]``; ``read_fn(ids)`` yields ``(ids, images)`` batches of
        full-image views. Returns whether a pass ran."""
        want = self.due_epoch(epoch)
        if self.epoch == want:
            return False
        meta = self.read_meta() if self.reuse else None
        gens = {int(g["epoch"]): g for g in (meta or {}).get("generations", [])}
        ran = False
        if want not in gens:
            barrier()  # nobody reads cache.json while rank 0 rewrites it
            self._write_shard(want, score_fn, read_fn)
            barrier()
            if self.rank == 0:
                self._commit(want, gens)
            barrier()
            gens = {int(g["epoch"]): g for g in self.read_meta()["generations"]}
            ran, self.reuse = True, True
            self.refreshes += 1
        self._open(gens[want])
        return ran

    def _write_shard(self, epoch: int, score_fn, read_fn) -> None:
        start, stop = self.ranges()[self.rank]
        name = f"e{epoch:06d}-r{self.rank:05d}.npy"
        tmp = self.folder / f".tmp-{name}"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(stop - start, *self.shape))
        for ids, images in read_fn(np.arange(start, stop)):
            maps = score_fn(images).float().clamp(-FP16_MAX, FP16_MAX).half().cpu().numpy()
            out[ids.numpy() - start] = maps
        out.flush()
        del out
        os.replace(tmp, self.folder / name)

    def _commit(self, epoch: int, gens: dict) -> None:
        shards = [[f"e{epoch:06d}-r{r:05d}.npy", a, b] for r, (a, b) in enumerate(self.ranges())]
        gens = {**gens, epoch: {"epoch": epoch, "shards": shards}}
        keep = sorted(gens)[-KEEP:]
        meta = {"signature": self.signature, "num_samples": self.num_samples, "shape": list(self.shape),
                "generations": [gens[e] for e in keep]}
        tmp = self.folder / f".tmp-{META}"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.folder / META)
        wanted = {s[0] for e in keep for s in gens[e]["shards"]}
        for path in self.folder.glob("e*-r*.npy"):  # older generations (open maps stay readable)
            if path.name not in wanted:
                path.unlink(missing_ok=True)

    def _open(self, gen: dict) -> None:
        self._shards = [(a, b, np.load(self.folder / name, mmap_mode="r")) for name, a, b in gen["shards"]]
        self.epoch = int(gen["epoch"])

    # ------------------------------------------------------------------ lookup

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """The mapped generation's maps of sample ids ``index`` ``[B]`` -> ``[B, C, gh, gw]`` fp16 (host)."""
        ids = index.numpy()
        out = np.empty((len(ids), *self.shape), dtype=np.float16)
        for a, b, arr in self._shards:
            sel = np.nonzero((ids >= a) & (ids < b))[0]
            if len(sel):
                out[sel] = arr[ids[sel] - a]
        return torch.from_numpy(out)

    def batch(self, batch: dict, device: torch.device) -> CachedBatch:
        """The cached maps of a loader batch and its first view's geometry, on ``device``."""
        maps = self.lookup(batch["index"])
        if device.type == "cuda":
            maps = maps.pin_memory()
        return CachedBatch(maps.to(device, non_blocking=True), batch["boxes"][:, 0], batch["sizes"],
                           batch["flips"][:, 0])


# ---------------------------------------------------------------------- the refresh pass's data


class _FullViews(IterableDataset):
    """Batches ``(ids, uint8 images)`` of whole images resized to ``size`` (no crop, no flip);
    each loader worker reads its own contiguous piece of ``ids``."""

    def __init__(self, source, ids: np.ndarray, size: int, batch_size: int, fast: bool):
        self.source, self.ids, self.size, self.batch_size, self.fast = source, ids, size, batch_size, fast

    def __iter__(self):
        from mimscale.data_pipeline.views import ViewSpec, decode_views

        info = get_worker_info()
        pieces = np.array_split(self.ids, info.num_workers if info else 1)
        ids = pieces[info.id if info else 0]
        spec = (ViewSpec(self.size, crop="full", flip_p=0.0),)
        blank = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start:start + self.batch_size]
            images = []
            for rec in self.source.read(chunk):
                try:  # an unreadable sample is never trained on (the loader stands in another): zeros
                    view = None if rec.error else decode_views(rec.data, spec, random.Random(0), rec.shape, self.fast)
                except Exception:  # noqa: BLE001 - the loader reports bad samples; the cache only skips them
                    view = None
                images.append(view.images[0] if view is not None else blank)
            yield torch.from_numpy(chunk), torch.stack(images)


def full_view_reader(source, size: int, batch_size: int, num_workers: int, device: torch.device,
                     fast: bool = True):
    """``read_fn`` for :meth:`ScoreCache.ensure`: normalised full-image views on ``device``."""
    from mimscale.data_pipeline.loader import _worker_init
    from mimscale.data_pipeline.views import normalize_uint8_on

    def read(ids: np.ndarray):
        data = _FullViews(source, ids, size, batch_size, fast)
        batches = iter(data) if num_workers == 0 else iter(DataLoader(
            data, batch_size=None, num_workers=num_workers, worker_init_fn=_worker_init,  # as training's
            generator=torch.Generator().manual_seed(0)))  # not from the global RNG: training's draws stay put
        for chunk, images in batches:
            yield chunk, normalize_uint8_on(images, device)

    return read


def signature(cfg) -> dict:
    """What a config's cached maps depend on (a cache written for anything else is not reused)."""
    from mimscale.config import score_source

    m, t = cfg.masking, cfg.teacher
    options = {"gpa": [m.gpa.block, m.gpa.head, m.gpa.queries], "ccmim": [m.ccmim.importance]}.get(m.strategy, [])
    return {"strategy": m.strategy, "options": options, "source": score_source(m), "teacher": t.type,
            "teacher_checkpoint": t.checkpoint, "teacher_model": t.model, "model": cfg.model.name,
            "img_size": cfg.model.img_size, "patch_size": cfg.model.patch_size}


def build_score_cache(cfg, method, num_samples: int, folder: Path, rank: int, world_size: int,
                      resumed: bool) -> ScoreCache | None:
    """The run's cache, or None when ``masking.score_cache.every_epochs`` is 0. A fresh run of a
    moving scorer never reuses maps found on disk (another run's weights made them); a resumed run,
    or a frozen teacher's (its maps depend on the checkpoint only), does."""
    every = cfg.masking.score_cache.every_epochs
    if not every:
        return None
    from mimscale.config import score_source

    frozen = score_source(cfg.masking) == "teacher" and cfg.teacher.type == "frozen"
    heads = getattr(method.strategy, "num_heads", 1) if cfg.masking.strategy == "idm" else 1
    cache = ScoreCache(folder, every, frozen, signature(cfg), num_samples,
                       (heads, *method.student.grid_size), rank, world_size)
    cache.reuse = resumed or frozen
    return cache
