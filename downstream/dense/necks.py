"""From single-stride ViT maps to the strides 4, 8, 16, 32 that dense heads expect.

Two ways, both from the papers: ViTDet's simple feature pyramid builds every level from the last
map alone; the BEiT/MAE UperNet recipe rescales maps taken from four depths (¼ ½ ¾ 1). Either way
a level below the patch stride is reached by stride-2 deconvolutions and one above it by max
pooling, so any power-of-two patch size (8, 14 is not, 16, 32) gives the same four strides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_STRIDES = (4, 8, 16, 32)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map (ViTDet's "LN" in convolutional parts)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "ln":
        return LayerNorm2d(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "syncbn":
        return nn.SyncBatchNorm(channels)
    raise ValueError(f"norm {kind!r} is not valid; valid: ln, bn, syncbn")


def _rescale(channels: int, patch_size: int, stride: int, norm: str, halve: bool) -> tuple[nn.Module, int]:
    """Module taking a stride-``patch_size`` map to ``stride``, and its output channels. Between
    two deconvolutions sits norm + GELU; ``halve`` halves the channels at each deconvolution
    (ViTDet), otherwise they are kept (BEiT)."""
    ratio = patch_size / stride
    steps = math.log2(ratio)
    if not steps.is_integer():
        raise ValueError(f"stride {stride} is not a power-of-two rescaling of patch size {patch_size}")
    steps = int(steps)
    if steps <= 0:
        return (nn.Identity() if steps == 0 else nn.MaxPool2d(2 ** -steps, 2 ** -steps)), channels
    layers: list[nn.Module] = []
    for k in range(steps):
        out = channels // 2 if halve else channels
        if k:
            layers += [norm_layer(norm, channels), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, out, 2, stride=2))
        channels = out
    return nn.Sequential(*layers), channels


class SimpleFeaturePyramid(nn.Module):
    """ViTDet: ``[B, D, H/p, W/p]`` -> one ``out_channels`` map per stride (4, 8, 16, 32 by default),
    each rescaled, then 1×1 conv + norm and 3×3 conv + norm."""

    def __init__(self, in_channels: int, patch_size: int, out_channels: int = 256,
                 strides: Sequence[int] = DEFAULT_STRIDES, norm: str = "ln"):
        super().__init__()
        self.strides = list(strides)
        self.out_channels = out_channels
        self.stages = nn.ModuleList()
        for s in self.strides:
            rescale, ch = _rescale(in_channels, patch_size, s, norm, halve=True)
            self.stages.append(nn.Sequential(
                rescale,
                nn.Conv2d(ch, out_channels, 1, bias=False), norm_layer(norm, out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), norm_layer(norm, out_channels)))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        last = features[-1]
        return [stage(last) for stage in self.stages]


class MultiLevelRescale(nn.Module):
    """BEiT/MAE UperNet: the i-th of four ``[B, D, H/p, W/p]`` maps -> stride ``strides[i]``,
    channels kept (norm + GELU between deconvolutions)."""

    def __init__(self, in_channels: int, patch_size: int, strides: Sequence[int] = DEFAULT_STRIDES,
                 norm: str = "bn"):
        super().__init__()
        self.strides = list(strides)
        self.out_channels = in_channels
        self.stages = nn.ModuleList(_rescale(in_channels, patch_size, s, norm, halve=False)[0]
                                    for s in self.strides)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.stages):
            raise ValueError(f"expected {len(self.stages)} feature maps (one per stride), got {len(features)}")
        return [stage(f) for stage, f in zip(self.stages, features)]


def depth_fractions_to_indices(depth: int, fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0)) -> list[int]:
    """Blocks at fractions of the depth (0-indexed): ViT-B (12) -> 2, 5, 8, 11; ViT-L -> 5, 11, 17, 23."""
    out = [round(f * depth) - 1 for f in fractions]
    if any(not 0 <= i < depth for i in out) or out != sorted(set(out)):
        raise ValueError(f"depth fractions {list(fractions)} do not give distinct blocks of {depth}")
    return out
