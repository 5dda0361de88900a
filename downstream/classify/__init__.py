"""Downstream classification: fine-tuning, linear probing, k-NN, semi-supervised subsets, data sets
from their official layouts, and robustness to occlusion and patch shuffling.

The names below are imported on first use (they need torch); the command line imports this
package to register its commands.
"""

from mimscale.lazy import lazy_exports

lazy_exports(__name__, {
    ".config": ["FinetuneConfig", "KNNRunConfig", "LinprobeConfig", "load_classify_config"],
    ".datasets": ["DATASETS", "DatasetLayoutError", "LabeledImages", "build_dataset"],
    ".knn": ["knn_scores", "merge", "nearest", "vote"],
    ".model": ["LinearProbe", "build_vit", "load_weights"],
    ".optim": ["LARS", "layer_decay_groups"],
    ".robustness": ["perturbed_forward"],
    ".subsets": ["draw_per_class", "read_subset_file"],
    ".weights": ["PretrainedWeights", "read_weights"],
})

__all__ = [
    "DATASETS", "DatasetLayoutError", "FinetuneConfig", "KNNRunConfig", "LARS", "LabeledImages",
    "LinearProbe", "LinprobeConfig", "PretrainedWeights", "build_dataset", "build_vit", "draw_per_class",
    "knn_scores", "layer_decay_groups", "load_classify_config", "load_weights", "merge", "nearest",
    "perturbed_forward", "read_subset_file", "read_weights", "vote",
]
