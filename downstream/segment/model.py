"""UperNet (Xiao et al. 2018) with an auxiliary FCN head on the ViT adapter, in plain PyTorch.

The heads follow mmseg's ``UPerHead`` / ``FCNHead`` as the MAE and BEiT ADE20K recipes use them:
a pyramid pooling module on the coarsest map, FPN top-down fusion, all levels upsampled to stride
4 and fused, dropout 0.1 and a 1x1 classifier; the auxiliary head reads the third level and its
loss weighs 0.4.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.data_pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD
from mimscale.downstream.dense.encoder import DenseEncoder

from .data import IGNORE_INDEX


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet's module: average-pool to each scale, 1x1 conv, upsample back, concat with the input."""

    def __init__(self, cin: int, channels: int, scales: Sequence[int]):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(cin, channels, 1))
                                    for s in scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [_up(stage(x), x.shape[-2:]) for stage in self.stages], dim=1)


class UperNetHead(nn.Module):
    """Multi-level maps (finest first) -> class logits at the finest stride."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.bottleneck = conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        laterals.append(self.bottleneck(self.ppm(features[-1])))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _up(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_up(x, size) for x in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head: conv-BN-ReLU, dropout, 1x1 classifier on one level."""

    def __init__(self, cin: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_relu(cin, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class UperNetSegmentor(nn.Module):
    """Images in [0, 1] ``[B, 3, H, W]`` -> logits ``[B, K, H, W]``; the auxiliary head only
    contributes to the training loss."""

    def __init__(self, backbone: DenseEncoder, num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), aux_channels: int = 256, aux_index: int = 2,
                 aux_weight: float = 0.4, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        levels = len(backbone.strides)
        self.decode_head = UperNetHead([backbone.out_channels] * levels, channels, num_classes, pool_scales, dropout)
        self.aux_head = FCNHead(backbone.out_channels, aux_channels, num_classes, dropout) if aux_weight > 0 else None
        self.aux_index, self.aux_weight = aux_index, aux_weight
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _run(self, images: torch.Tensor):
        """Normalise, pad to a multiple of the patch size (the ViT needs it), run the backbone;
        also returns how to bring a head's logits to the input size."""
        h, w = images.shape[-2:]
        p = self.backbone.vit.patch_size
        x = F.pad((images - self.mean) / self.std, (0, (-w) % p, 0, (-h) % p))
        return self.backbone(x), lambda logits: _up(logits, x.shape[-2:])[..., :h, :w]

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        """Logits; with ``labels`` the training losses instead (as torchvision's detectors do):
        cross-entropy (ignore 255) of the decode head plus ``aux_weight`` x that of the auxiliary
        head, both on logits upsampled to the label size."""
        features, to_input = self._run(images)
        logits = to_input(self.decode_head(features))
        if labels is None:
            return logits
        out = {"loss_seg": F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)}
        if self.aux_head is not None:
            aux = to_input(self.aux_head(features[self.aux_index]))
            out["loss_aux"] = self.aux_weight * F.cross_entropy(aux.float(), labels, ignore_index=IGNORE_INDEX)
        return out


@torch.no_grad()
def slide_inference(model: UperNetSegmentor, image: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """mmseg's ``slide`` mode: logits of overlapping ``crop`` windows every ``stride`` pixels,
    averaged where they overlap. ``image [1, 3, H, W]`` -> ``[1, K, H, W]``."""
    _, _, H, W = image.shape
    rows = max(H - crop + stride - 1, 0) // stride + 1
    cols = max(W - crop + stride - 1, 0) // stride + 1
    total = image.new_zeros(1, model.num_classes, H, W)
    count = image.new_zeros(1, 1, H, W)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride + crop, H), min(c * stride + crop, W)
            y0, x0 = max(y1 - crop, 0), max(x1 - crop, 0)
            total[..., y0:y1, x0:x1] += model(image[..., y0:y1, x0:x1]).float()
            count[..., y0:y1, x0:x1] += 1
    return total / count
