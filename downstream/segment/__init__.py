"""ADE20K UperNet on a pretrained ViT: data, model, metrics, and the runner."""

from .data import ADE20KSegmentation, SegTrainTransform, reduce_zero_label
from .metrics import confusion_matrix, majority_baseline, segmentation_metrics
from .model import FCNHead, UperNetHead, UperNetSegmentor, slide_inference
from .task import SegmentConfig, SegmentTask, load_segment_config, run_segment

__all__ = ["ADE20KSegmentation", "FCNHead", "SegTrainTransform", "SegmentConfig", "SegmentTask",
           "UperNetHead", "UperNetSegmentor", "confusion_matrix", "load_segment_config",
           "majority_baseline", "reduce_zero_label", "run_segment", "segmentation_metrics",
           "slide_inference"]
