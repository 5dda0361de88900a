"""Teachers: the networks whose no-grad attention guides masking (SPEC §7).

The EMA update is one fused ``lerp`` over parameter lists. Under FSDP2 / ZeRO-3 the teacher is
sharded exactly like the student, so both lists hold local shards of the same layout and the update
needs no gather.
"""

from __future__ import annotations

import math

import torch


def ema_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Cosine ramp of the EMA momentum from ``base`` at step 0 to ``final`` at ``total_steps``."""
    progress = min(1.0, step / max(1, total_steps))
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update_(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    """In place: ``θ_t ← m·θ_t + (1−m)·θ_s`` for every pair, as one fused foreach lerp."""
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors, student {len(student)}")
    if teacher:
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)
