"""What detection and segmentation share: the ViT backbone adapter (windowed attention, resized
position table, drop path), the two feature pyramids, layer-wise lr decay, weight loading and
the fine-tuning loop.

The names below are imported on first use (they need torch); the command line imports this
package to register ``detect`` and ``segment``.
"""

from mimscale.lazy import lazy_exports

lazy_exports(__name__, {
    ".backbone": ["ViTBackbone", "default_global_blocks", "resize_pos_embed", "window_partition", "window_unpartition"],
    ".encoder": ["DenseEncoder", "build_dense_encoder"],
    ".necks": ["LayerNorm2d", "MultiLevelRescale", "SimpleFeaturePyramid", "depth_fractions_to_indices"],
    ".optim": ["layer_decay_param_groups", "layer_id"],
    ".weights": ["EncoderWeights", "build_backbone", "load_backbone_weights", "read_encoder_weights"],
})

__all__ = [
    "DenseEncoder", "EncoderWeights", "LayerNorm2d", "MultiLevelRescale", "SimpleFeaturePyramid",
    "ViTBackbone", "build_backbone", "build_dense_encoder", "default_global_blocks",
    "depth_fractions_to_indices", "layer_decay_param_groups", "layer_id", "load_backbone_weights",
    "read_encoder_weights", "resize_pos_embed", "window_partition", "window_unpartition",
]
