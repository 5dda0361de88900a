"""Analyses that papers argue with: attention distance and entropy, CKA between layers, how masks
cover objects, PIMR over mask ratios, and training curves. Each command writes a CSV and a PNG.

The math lives in pure functions (``attention``, ``cka``, ``pimr``), tested against direct
implementations; the commands only load checkpoints and images, call them and draw.

The names below are imported on first use (they need torch); the command line imports this
package to register ``analyze``.
"""

from mimscale.lazy import lazy_exports

lazy_exports(__name__, {
    ".attention": ["attention_distance", "attention_entropy", "patch_attention"],
    ".cka": ["MinibatchCKA", "unbiased_hsic"],
    ".pimr": ["global_pimr", "pimr"],
})

__all__ = [
    "MinibatchCKA",
    "attention_distance",
    "attention_entropy",
    "global_pimr",
    "patch_attention",
    "pimr",
    "unbiased_hsic",
]
