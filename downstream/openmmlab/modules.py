"""The adapter as OpenMMLab modules: the same backbone, pyramids and layer decay as ``mimscale
detect|segment``, so weights and results carry over between the two paths."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.registry import OPTIM_WRAPPERS, OPTIMIZERS

from mimscale.downstream.dense.backbone import ViTBackbone
from mimscale.downstream.dense.necks import (
    LayerNorm2d,
    MultiLevelRescale,
    SimpleFeaturePyramid,
    depth_fractions_to_indices,
)
from mimscale.downstream.dense.optim import layer_decay_param_groups
from mimscale.downstream.dense.weights import load_backbone_weights


class MimViT(BaseModule):
    """A pretrained ViT for mmdet / mmseg. ``arch`` is a mimscale model name; ``out_indices``
    ``'quarters'`` takes blocks at ¼ ½ ¾ 1 of the depth (UperNet), ``None`` the last block
    (simple pyramid). ``init_cfg=dict(type='Pretrained', checkpoint=PATH)`` loads a
    ``mimscale convert`` file, a mimscale checkpoint folder or an MAE/timm file, strictly."""

    def __init__(self, arch: str = "mae_vit_base_patch16", patch_size: int | None = None, img_size: int = 1024,
                 drop_path_rate: float = 0.1, window_size: int = 14, global_blocks=None, out_indices=None,
                 activation_checkpointing: bool = False, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.vit = ViTBackbone.from_name(arch, patch_size=patch_size, pretrain_img_size=img_size,
                                         drop_path=drop_path_rate, window_size=window_size,
                                         global_blocks=global_blocks,
                                         activation_checkpointing=activation_checkpointing)
        if out_indices == "quarters":
            out_indices = depth_fractions_to_indices(self.vit.depth)
        if out_indices is not None:
            self.vit.out_indices = list(out_indices)

    def init_weights(self) -> None:
        cfg = self.init_cfg or {}
        if isinstance(cfg, dict) and cfg.get("type") == "Pretrained":
            # mmengine's own Pretrained init loads non-strictly (a key mismatch would pass silently)
            ignored = load_backbone_weights(self.vit, cfg["checkpoint"])
            print(f"MimViT: loaded {cfg['checkpoint']} (ignored: {', '.join(ignored) or 'nothing'})")
            self._is_init = True
            return
        super().init_weights()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.vit(x))


class MimSimpleFPN(BaseModule):
    """ViTDet's simple feature pyramid (strides 4-32 from the last map); ``num_outs=5`` adds a
    stride-64 max-pool level as mmdet's Mask R-CNN RPN expects."""

    def __init__(self, in_channels: int = 768, patch_size: int = 16, out_channels: int = 256,
                 num_outs: int = 5, norm: str = "ln", init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        if num_outs not in (4, 5):
            raise ValueError(f"num_outs {num_outs} is not valid; valid: 4, 5")
        self.pyramid = SimpleFeaturePyramid(in_channels, patch_size, out_channels, norm=norm)
        self.num_outs = num_outs

    def forward(self, inputs) -> tuple[torch.Tensor, ...]:
        outs = self.pyramid(list(inputs))
        if self.num_outs == 5:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return tuple(outs)


class MimMultiLevelNeck(BaseModule):
    """BEiT/MAE UperNet rescaling: four block outputs to strides 4, 8, 16, 32, width kept."""

    def __init__(self, in_channels: int = 768, patch_size: int = 16, norm: str = "bn", init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.rescale = MultiLevelRescale(in_channels, patch_size, norm=norm)

    def forward(self, inputs) -> tuple[torch.Tensor, ...]:
        return tuple(self.rescale(list(inputs)))


class MimLayerDecayOptimizerConstructor:
    """``constructor='MimLayerDecayOptimizerConstructor'`` with ``paramwise_cfg=dict(num_layers=12,
    layer_decay_rate=0.65)``: the param groups of ``mimscale detect|segment`` (the backbone must be
    ``MimViT``)."""

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None):
        self.optim_wrapper_cfg = copy.deepcopy(dict(optim_wrapper_cfg))
        self.optimizer_cfg = self.optim_wrapper_cfg.pop("optimizer")
        paramwise_cfg = dict(paramwise_cfg or {})
        unknown = set(paramwise_cfg) - {"num_layers", "layer_decay_rate"}
        if unknown or "num_layers" not in paramwise_cfg:
            raise ValueError(f"paramwise_cfg needs num_layers (and optionally layer_decay_rate); got {sorted(paramwise_cfg)}")
        self.num_layers = int(paramwise_cfg["num_layers"])
        self.decay = float(paramwise_cfg.get("layer_decay_rate", 1.0))

    def __call__(self, model):
        if hasattr(model, "module"):
            model = model.module
        optimizer_cfg = copy.deepcopy(dict(self.optimizer_cfg))
        groups = layer_decay_param_groups(model, optimizer_cfg["lr"], optimizer_cfg.get("weight_decay", 0.0),
                                          self.decay, self.num_layers, backbone_prefix="backbone.vit.")
        for g in groups:
            g.pop("names")
        optimizer_cfg["params"] = groups
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        return OPTIM_WRAPPERS.build({**self.optim_wrapper_cfg, "optimizer": optimizer})


__all__ = ["LayerNorm2d", "MimLayerDecayOptimizerConstructor", "MimMultiLevelNeck", "MimSimpleFPN", "MimViT"]
