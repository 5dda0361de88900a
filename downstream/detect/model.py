"""Mask R-CNN on the ViT adapter, assembled from torchvision's detection components.

ViTDet's heads (its Mask R-CNN baseline): a 2-conv RPN head, a 4-conv + 1-fc box head and a
4-conv mask head, every conv followed by LayerNorm; five pyramid levels (strides 4-32 from the
simple feature pyramid, plus a stride-64 max-pool level for the RPN). RoIAlign and NMS are
torchvision.ops.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from mimscale.downstream.dense.encoder import DenseEncoder
from mimscale.downstream.dense.necks import LayerNorm2d

LEVELS = ("0", "1", "2", "3")


class RCNNBackbone(nn.Module):
    """The dense encoder in torchvision's backbone contract: an ordered dict of maps, ``pool`` (a
    stride-2 subsampling of the coarsest level, as detectron2's LastLevelMaxPool) last."""

    def __init__(self, encoder: DenseEncoder):
        super().__init__()
        self.vit, self.neck = encoder.vit, encoder.neck
        self.out_channels = encoder.out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict:
        maps = self.neck(self.vit(images))
        out = OrderedDict(zip(LEVELS, maps))
        out["pool"] = F.max_pool2d(maps[-1], kernel_size=1, stride=2)
        return out


def build_mask_rcnn(encoder: DenseEncoder, num_classes: int, cfg, min_size, max_size: int) -> MaskRCNN:
    """``num_classes`` object classes (background added here); ``cfg`` is a
    :class:`~mimscale.downstream.detect.task.DetectModelConfig`. ``min_size`` / ``max_size`` drive
    torchvision's resize: a tuple of short sides is multi-scale training (the last one at test)."""
    if len(cfg.anchor_sizes) != len(LEVELS) + 1:
        raise ValueError(f"model.anchor_sizes needs {len(LEVELS) + 1} sizes (one per level), got {cfg.anchor_sizes}")
    c = encoder.out_channels
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * (len(LEVELS) + 1))
    box_head = FastRCNNConvFCHead((c, 7, 7), [cfg.head_channels] * cfg.box_convs, [cfg.fc_dim],
                                  norm_layer=LayerNorm2d)
    mask_head = MaskRCNNHeads(c, [cfg.head_channels] * cfg.mask_convs, 1, norm_layer=LayerNorm2d)
    return MaskRCNN(
        RCNNBackbone(encoder), num_classes=None,
        min_size=min_size, max_size=max_size, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        rpn_anchor_generator=anchors, rpn_head=RPNHead(c, 3, conv_depth=cfg.rpn_convs),
        rpn_pre_nms_top_n_train=cfg.proposals_train, rpn_post_nms_top_n_train=cfg.proposals_train,
        rpn_pre_nms_top_n_test=cfg.proposals_test, rpn_post_nms_top_n_test=cfg.proposals_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_roi_pool=MultiScaleRoIAlign(list(LEVELS), 7, 2), box_head=box_head,
        box_predictor=FastRCNNPredictor(cfg.fc_dim, num_classes + 1),
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_score_thresh=cfg.score_threshold, box_detections_per_img=cfg.detections_per_image,
        mask_roi_pool=MultiScaleRoIAlign(list(LEVELS), 14, 2), mask_head=mask_head,
        mask_predictor=MaskRCNNPredictor(cfg.head_channels, cfg.head_channels, num_classes + 1))
