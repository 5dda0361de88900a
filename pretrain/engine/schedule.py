"""Per-step learning-rate schedule and the run's length in steps."""

from __future__ import annotations

import math


def cosine_lr(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 to ``base_lr``, then half-cosine down to ``min_lr`` at ``total_steps``.

    MAE steps its schedule per iteration with a fractional epoch; indexing by the global step is the
    same curve and makes a resumed run's lr independent of how it was interrupted.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(blr: float, effective_batch: int) -> float:
    """MAE's linear scaling rule: lr = blr × effective batch / 256."""
    return blr * effective_batch / 256
