"""Build the pretraining data stream a config asks for."""

from __future__ import annotations

import os
from pathlib import Path

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


def build_pretrain_data(cfg_data, img_size: int, seed: int, rank: int = 0, world_size: int = 1):
    """A resumable loader of augmented images for ``cfg_data`` (see ``loader.PretrainLoader``)."""
    from .loader import build_pretrain_loader

    if cfg_data.source == "synthetic":
        from .synthetic import ensure_imagefolder

        root = synthetic_root(cfg_data)
        if rank == 0:
            ensure_imagefolder(root, cfg_data.synthetic_images, size=cfg_data.synthetic_size,
                               seed=SYNTHETIC_SEED, progress=True)
        _barrier(world_size)
    else:
        root = cfg_data.root
    return build_pretrain_loader(imagefolder_root(root), img_size, cfg_data.batch_size, seed,
                                 cfg_data.num_workers, crop_scale=tuple(cfg_data.crop_scale),
                                 hflip=cfg_data.hflip, rank=rank, world_size=world_size)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
