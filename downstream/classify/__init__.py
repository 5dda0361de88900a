"""Downstream classification: fine-tuning, linear probing, k-NN, semi-supervised subsets, data sets
from their official layouts, and robustness to occlusion and patch shuffling."""

from .config import FinetuneConfig, KNNRunConfig, LinprobeConfig, load_classify_config
from .datasets import DATASETS, DatasetLayoutError, LabeledImages, build_dataset
from .knn import knn_scores, merge, nearest, vote
from .model import LinearProbe, build_vit, load_weights
from .optim import LARS, layer_decay_groups
from .robustness import perturbed_forward
from .subsets import draw_per_class, read_subset_file
from .weights import PretrainedWeights, read_weights

__all__ = [
    "DATASETS", "DatasetLayoutError", "FinetuneConfig", "KNNRunConfig", "LARS", "LabeledImages",
    "LinearProbe", "LinprobeConfig", "PretrainedWeights", "build_dataset", "build_vit", "draw_per_class",
    "knn_scores", "layer_decay_groups", "load_classify_config", "load_weights", "merge", "nearest",
    "perturbed_forward", "read_subset_file", "read_weights", "vote",
]
