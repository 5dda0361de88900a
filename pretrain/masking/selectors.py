"""Selectors turn scores into bool masks ``[B, N]`` (True = hidden), exact counts per image."""

from __future__ import annotations

import torch

from .functional import num_visible


def topk_mask(scores: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Hide the ``num_masked`` highest scores of each row (SPEC §1 ``topk``)."""
    idx = scores.float().topk(num_masked, dim=1).indices
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(1, idx, True)


def random_mask(batch: int, n: int, ratio: float, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """MAE's random masking: ``topk`` of U[0, 1) noise, N − K hidden per image."""
    gen_device = generator.device if generator is not None else device
    noise = torch.rand(batch, n, generator=generator, device=gen_device).to(device)
    return topk_mask(noise, n - num_visible(n, ratio))
