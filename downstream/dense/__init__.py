"""What detection and segmentation share: the ViT backbone adapter (windowed attention, resized
position table, drop path), the two feature pyramids, layer-wise lr decay, weight loading and
the fine-tuning loop."""

from .backbone import (
    ViTBackbone,
    default_global_blocks,
    resize_pos_embed,
    window_partition,
    window_unpartition,
)
from .encoder import DenseEncoder, build_dense_encoder
from .necks import LayerNorm2d, MultiLevelRescale, SimpleFeaturePyramid, depth_fractions_to_indices
from .optim import layer_decay_param_groups, layer_id
from .weights import EncoderWeights, build_backbone, load_backbone_weights, read_encoder_weights

__all__ = [
    "DenseEncoder", "EncoderWeights", "LayerNorm2d", "MultiLevelRescale", "SimpleFeaturePyramid",
    "ViTBackbone", "build_backbone", "build_dense_encoder", "default_global_blocks",
    "depth_fractions_to_indices", "layer_decay_param_groups", "layer_id", "load_backbone_weights",
    "read_encoder_weights", "resize_pos_embed", "window_partition", "window_unpartition",
]
