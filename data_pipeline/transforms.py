"""Image transforms matching the official MAE recipes (torchvision v1 API).

Why v1: its random ops draw only from torch's global RNG, which the loader reseeds per sample,
so a sample's augmentation is reproducible regardless of the worker that loads it.
"""

from __future__ import annotations

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def mae_train_transform(img_size: int, scale: tuple[float, float] = (0.2, 1.0),
                        hflip: bool = True) -> T.Compose:
    """MAE pretraining augmentation: random resized crop (bicubic) + flip + normalise."""
    ops = [T.RandomResizedCrop(img_size, scale=scale, interpolation=InterpolationMode.BICUBIC)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


def eval_transform(img_size: int, crop_pct: float = 0.875) -> T.Compose:
    """Resize the short side to ``img_size / crop_pct``, center-crop ``img_size``, normalise."""
    return T.Compose([
        T.Resize(round(img_size / crop_pct), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(img_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo ImageNet normalisation of ``[..., 3, H, W]`` and clamp to [0, 1] for figures."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)
