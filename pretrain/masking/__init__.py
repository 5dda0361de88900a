"""Masking: the pure functions of SPEC §8 (``functional``), selectors, strategies and multi-shot
plans. Adding a method means one strategy class here and one recipe YAML."""

from .functional import num_visible
from .multishot import ShotPlan
from .selectors import SELECTORS, mask_from_keys, masked_counts, random_mask, select
from .strategies import MaskingContext, MaskResult, Strategy, build_strategy

__all__ = ["SELECTORS", "MaskResult", "MaskingContext", "ShotPlan", "Strategy", "build_strategy",
           "mask_from_keys", "masked_counts", "num_visible", "random_mask", "select"]
