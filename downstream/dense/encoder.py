"""Backbone + neck as one module: images -> feature maps at strides 4, 8, 16, 32."""

from __future__ import annotations

import torch
from torch import nn

from .backbone import ViTBackbone
from .necks import MultiLevelRescale, SimpleFeaturePyramid, depth_fractions_to_indices
from .weights import build_backbone

PYRAMIDS = ("simple", "multilevel")


class DenseEncoder(nn.Module):
    """``vit`` (a :class:`ViTBackbone`) then ``neck``; ``out_channels`` and ``strides`` describe the
    output maps."""

    def __init__(self, vit: ViTBackbone, neck: nn.Module):
        super().__init__()
        self.vit = vit
        self.neck = neck
        self.out_channels = neck.out_channels
        self.strides = neck.strides

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.neck(self.vit(images))


def build_dense_encoder(cfg, pyramid: str = "simple", out_channels: int = 256) -> DenseEncoder:
    """From a :class:`~mimscale.downstream.dense.config.BackboneConfig`: ``simple`` is ViTDet's
    pyramid from the last map (``out_channels`` wide), ``multilevel`` the BEiT/MAE UperNet maps from
    blocks at ¼ ½ ¾ 1 of the depth (encoder width)."""
    if pyramid not in PYRAMIDS:
        raise ValueError(f"pyramid {pyramid!r} is not valid; valid: {', '.join(PYRAMIDS)}")
    kwargs = dict(pretrain_img_size=cfg.pretrain_img_size, drop_path=cfg.drop_path,
                  window_size=cfg.window_size, global_blocks=cfg.global_blocks,
                  activation_checkpointing=cfg.activation_checkpointing)
    vit = build_backbone(cfg.name, cfg.checkpoint, cfg.patch_size, **kwargs)
    if pyramid == "simple":
        return DenseEncoder(vit, SimpleFeaturePyramid(vit.embed_dim, vit.patch_size, out_channels, norm="ln"))
    vit.out_indices = depth_fractions_to_indices(vit.depth)
    return DenseEncoder(vit, MultiLevelRescale(vit.embed_dim, vit.patch_size, norm="bn"))
