"""The pure mathematical core of masking (SPEC §8): no module state, batch-first."""

from __future__ import annotations


def num_visible(n: int, ratio: float) -> int:
    """Visible patches K = int(n·(1−ratio)), floored exactly as MAE computes it (49 of 196 at 0.75)."""
    return int(n * (1 - ratio))
