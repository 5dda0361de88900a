"""Build the pretraining data stream a config asks for."""

from __future__ import annotations

import os
from pathlib import Path

from mimscale.errors import DataError

SYNTHETIC_SEED = 0  # the generated set is fixed data, not a function of the run's seed


def cache_dir() -> Path:
    """Where generated data is cached: ``$MIMSCALE_CACHE``, else ``$XDG_CACHE_HOME/mimscale``."""
    if os.environ.get("MIMSCALE_CACHE"):
        return Path(os.environ["MIMSCALE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mimscale"


def synthetic_root(cfg_data) -> Path:
    """The folder of the generated set: ``data.root`` if given, else one per (count, size) in the cache."""
    if cfg_data.root:
        return Path(cfg_data.root)
    return cache_dir() / "synthetic" / f"n{cfg_data.synthetic_images}_s{cfg_data.synthetic_size}"


def imagefolder_root(root: str | Path) -> Path:
    """ImageNet-style roots hold ``train/``; a folder of class sub-folders is used as it is."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data.root {root} does not exist")
    return root / "train" if (root / "train").is_dir() else root


def build_source(cfg_data, rank: int = 0, world_size: int = 1):
    """The source ``data.source`` names; whatever must be scanned or generated is done by rank 0."""
    if cfg_data.source == "synthetic":
        from .synthetic import ensure_imagefolder

        root = synthetic_root(cfg_data)
        if rank == 0:
            ensure_imagefolder(root, cfg_data.synthetic_images, size=cfg_data.synthetic_size,
                               seed=SYNTHETIC_SEED, progress=True)
        _barrier(world_size)
    if cfg_data.source in ("imagefolder", "synthetic"):
        from .sources.imagefolder import ImageFolderSource

        root = synthetic_root(cfg_data) if cfg_data.source == "synthetic" else cfg_data.root
        return ImageFolderSource(imagefolder_root(root))
    if cfg_data.source == "wds":
        from .sources.wds import TarShardSource

        # Counting samples may read every shard's headers: once, on rank 0, shared with the rest.
        sizes = _on_rank0(lambda: TarShardSource(cfg_data.urls, cfg_data.allow_pipe).shard_sizes,
                          rank, world_size)
        return TarShardSource(cfg_data.urls, cfg_data.allow_pipe, shard_sizes=sizes)
    if cfg_data.source == "ffcv":
        from .sources.beton import BetonSource

        urls = [cfg_data.urls] if isinstance(cfg_data.urls, str) else list(cfg_data.urls or [])
        if len(urls) != 1:
            raise DataError(f"data.urls: data.source=ffcv reads one .beton file, got {urls!r}")
        return BetonSource(urls[0])
    raise ValueError(f"data.source: unknown source {cfg_data.source!r}")


def build_views(cfg_data, img_size: int):
    from .views import mae_views, mocov3_views

    if cfg_data.views == "mocov3":
        return mocov3_views(img_size, tuple(cfg_data.crop_scale))
    return mae_views(img_size, tuple(cfg_data.crop_scale), cfg_data.hflip)


def build_pretrain_data(cfg_data, img_size: int, seed: int, rank: int = 0, world_size: int = 1,
                        device="cpu", resolution=()):
    """A resumable, exactly-once loader of augmented views for ``cfg_data`` (``loader.PretrainLoader``),
    delivering normalised batches on ``device``; ``resolution``: (first epoch, size) phases of the views."""
    from .loader import PretrainLoader

    views = build_views(cfg_data, img_size)
    decode = resolve_decode(cfg_data.decode, views, device)
    return PretrainLoader(build_source(cfg_data, rank, world_size), views,
                          cfg_data.batch_size, seed, cfg_data.num_workers, rank, world_size,
                          remainder=cfg_data.remainder, max_bad_fraction=cfg_data.max_bad_fraction,
                          fast_decode=cfg_data.fast_decode, device=device, decode=decode, resolution=resolution,
                          prefetch_factor=cfg_data.prefetch_factor, pin_memory=cfg_data.pin_memory,
                          stage=resolve_stage(cfg_data.stage, decode, device))


def resolve_decode(decode: str, views, device) -> str:
    """``data.decode`` for this run: auto is gpu when training on CUDA with views the device can
    make (non-JPEG samples are decoded in the workers either way, so auto costs PNG data nothing)."""
    import torch

    from .gpu_decode import device_ready

    if decode != "auto":
        return decode
    return "gpu" if torch.device(device).type == "cuda" and device_ready(views) else "cpu"


def resolve_stage(stage: str, decode: str, device) -> str:
    """``data.stage`` for this run: auto is thread where the device decodes the JPEGs on CUDA
    (torchvision's nvJPEG call holds the calling thread until the batch is decoded), else main."""
    import torch

    if stage != "auto":
        return stage
    return "thread" if decode == "gpu" and torch.device(device).type == "cuda" else "main"


def _on_rank0(fn, rank: int, world_size: int):
    """``fn()`` computed on rank 0 and shared; an error there is raised on every rank (no hang)."""
    if world_size == 1:
        return fn()
    import torch.distributed as dist

    box = [None]
    if rank == 0:
        try:
            box = [(True, fn())]
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            box = [(False, e)]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
