"""Pixel reconstruction (MAE, SPEC §7) with multi-shot weights (SPEC §6)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def global_count(mask: torch.Tensor) -> torch.Tensor:
    """Hidden patches per rank, averaged over ranks: with DDP's gradient averaging, a local sum
    divided by this is the exact mean over the global batch even when ranks hide different counts."""
    count = mask.sum().float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = count.clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp_min(1.0)


def shot_weighted_pixel_loss(per_patch: torch.Tensor, shot_masks: list[torch.Tensor], mode: str = "union",
                             ratios: list[float] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(loss, per-shot means). ``union``: one mean over every hidden patch (eq. 8); ``equal``: the
    mean of the shots' means; ``ratio``: shot means weighted by their ratios η (Table 3)."""
    means = [(per_patch * m).sum() / global_count(m) for m in shot_masks]
    if mode == "union" or len(shot_masks) == 1:
        union = torch.stack(shot_masks).any(0) if len(shot_masks) > 1 else shot_masks[0]
        return (per_patch * union).sum() / global_count(union), means
    weights = [1 / len(means)] * len(means) if mode == "equal" else list(ratios)
    return sum(w * v for w, v in zip(weights, means)), means
