"""What the tools share: a method built from a checkpoint plus overrides, and labelled images."""

from __future__ import annotations

from pathlib import Path

import torch

from mimscale.config import Config, apply_overrides, from_dict, load_config
from mimscale.data_pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD


def config_for(checkpoint: str | None, overrides: list[str]) -> Config:
    """The config of a mimscale checkpoint (if given) with overrides on top; else recipe + overrides.

    Tools score images rather than train, so a missing data root is not an error here.
    """
    base = ["data.source=synthetic"]
    folder = _mimscale_folder(checkpoint)
    if folder is not None:
        from mimscale.pretrain.engine.checkpoint import load_checkpoint

        return apply_overrides(from_dict(load_checkpoint(folder)["config"]), base + list(overrides))
    return load_config(base + list(overrides))


def _mimscale_folder(checkpoint: str | None) -> Path | None:
    """The complete checkpoint a path names (a run folder means its newest), or None when the path
    is not a mimscale checkpoint: the same rule as ``mimscale analyze`` and the classifiers."""
    if not checkpoint:
        return None
    from .analysis.encoders import resolve_mimscale

    return resolve_mimscale(Path(checkpoint))


@torch.no_grad()
def load_student_weights(model: torch.nn.Module, checkpoint: str | None) -> None:
    """Student weights (in place) from any checkpoint ``mimscale analyze`` reads: a mimscale run,
    checkpoint folder or ``state.pt``, an official MAE ``.pth``, a timm state dict."""
    if not checkpoint:
        return
    from mimscale.pretrain.models import load_mae_checkpoint

    from .analysis.encoders import read_weights

    load_mae_checkpoint(model, read_weights(Path(checkpoint))[0])


def normalize(image_uint8) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[3, H, W]`` ImageNet-normalised float."""
    x = torch.as_tensor(image_uint8).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def patch_foreground(instance_map, patch: int, min_cover: float = 0.5) -> torch.Tensor:
    """``[N]`` bool: patches at least ``min_cover`` covered by an object."""
    obj = torch.as_tensor(instance_map > 0).float()
    gh, gw = obj.shape[0] // patch, obj.shape[1] // patch
    cover = obj[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).mean(dim=(1, 3))
    return cover.flatten() >= min_cover


def synthetic_with_foreground(n: int, size: int, patch: int, seed: int = 0):
    """Generated images ``[n, 3, size, size]`` (normalised) and their patch foreground ``[n, N]``."""
    from mimscale.data_pipeline.synthetic import sample_at

    samples = [sample_at(seed, i, size=size) for i in range(n)]
    images = torch.stack([normalize(s.image) for s in samples])
    fg = torch.stack([patch_foreground(s.instance_map(), patch) for s in samples])
    return images, fg
