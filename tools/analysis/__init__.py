"""Analyses that papers argue with: attention distance and entropy, CKA between layers, how masks
cover objects, PIMR over mask ratios, and training curves. Each command writes a CSV and a PNG.

The math lives in pure functions (``attention``, ``cka``, ``pimr``), tested against direct
implementations; the commands only load checkpoints and images, call them and draw.
"""

from .attention import attention_distance, attention_entropy, patch_attention
from .cka import MinibatchCKA, unbiased_hsic
from .pimr import global_pimr, pimr

__all__ = [
    "MinibatchCKA",
    "attention_distance",
    "attention_entropy",
    "global_pimr",
    "patch_attention",
    "pimr",
    "unbiased_hsic",
]
