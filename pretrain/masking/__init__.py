"""Masking: pure functions (``functional``), selectors, and the strategies a config names."""

from __future__ import annotations

import torch

from .functional import num_visible
from .selectors import random_mask, topk_mask

__all__ = ["RandomMasking", "build_masking", "num_visible", "random_mask", "topk_mask"]


class RandomMasking:
    """MAE's strategy: a uniformly random subset of ``N − K`` patches per image."""

    def __init__(self, ratio: float):
        self.ratio = ratio

    def __call__(self, images: torch.Tensor, num_patches: int, generator: torch.Generator) -> torch.Tensor:
        return random_mask(images.shape[0], num_patches, self.ratio, generator, images.device)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_masking(cfg) -> RandomMasking:
    """The strategy named by ``cfg.masking`` (config validation guarantees the name is known)."""
    if cfg.strategy == "random":
        return RandomMasking(cfg.ratio)
    raise ValueError(f"unknown masking strategy {cfg.strategy!r}")
