"""COCO Mask R-CNN on a pretrained ViT (ViTDet): data, model, evaluation, and the runner."""

from .data import CocoInstances, LargeScaleJitter, boxes_from_masks
from .evaluate import coco_metrics, to_coco_results
from .model import RCNNBackbone, build_mask_rcnn
from .task import DetectConfig, DetectTask, load_detect_config, run_detect

__all__ = ["CocoInstances", "DetectConfig", "DetectTask", "LargeScaleJitter", "RCNNBackbone",
           "boxes_from_masks", "build_mask_rcnn", "coco_metrics", "load_detect_config", "run_detect",
           "to_coco_results"]
