"""Selectors turn scores into bool masks ``[B, N]`` (True = hidden), SPEC §1.

Every selector is an ordering of the patches (highest key = hidden first) cut at each image's own
count, so per-image counts may differ (AMR) and the batch is handled at once, without a Python loop
over images. Ties are broken by patch index (stable sort), so a seed fixes the result.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .functional import gumbel_keys, num_visible, to_device

SELECTORS = ("topk", "sample", "noisy_topk", "random", "block")


def masked_counts(n: int, ratio: float | torch.Tensor, batch: int, device=None) -> torch.Tensor:
    """``N − K`` per image, ``[B]`` long, with ``K = int(N·(1−r))`` for a scalar or per-image ratio."""
    if isinstance(ratio, torch.Tensor):
        visible = torch.floor(n * (1 - ratio.double())).long()
        return (n - visible).to(device)
    return torch.full((batch,), n - num_visible(n, ratio), dtype=torch.long, device=device)


def mask_from_keys(keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Hide, in each row, the ``counts[b]`` patches with the highest keys."""
    order = torch.sort(keys.float(), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(keys.shape[1], device=keys.device).expand_as(order))
    return rank < counts.to(keys.device)[:, None]


def _uniform(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    dev = generator.device if generator is not None else device
    return to_device(torch.rand(shape, generator=generator, device=dev), device)


def topk_mask(scores: torch.Tensor, counts: torch.Tensor | int) -> torch.Tensor:
    """``topk``: hide the highest scores."""
    return mask_from_keys(scores, _as_counts(counts, scores))


def sample_mask(probs: torch.Tensor, counts: torch.Tensor | int, generator=None) -> torch.Tensor:
    """``sample``: draw without replacement ∝ ``probs`` (Gumbel-top-k; any prefix of the Gumbel
    order is an exact sequential draw, so per-image counts come for free)."""
    return mask_from_keys(gumbel_keys(probs, generator), _as_counts(counts, probs))


def noisy_topk_mask(scores: torch.Tensor, counts: torch.Tensor | int, width: float, generator=None) -> torch.Tensor:
    """``noisy_topk(width)``: ``topk`` of ``s + U[0, width)``."""
    noise = _uniform(scores.shape, generator, scores.device) * width
    return mask_from_keys(scores.float() + noise, _as_counts(counts, scores))


def random_mask(batch: int, n: int, ratio: float | torch.Tensor, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """MAE's random masking: ``topk`` of U[0, 1) noise, ``N − K`` hidden per image."""
    counts = masked_counts(n, ratio, batch, device)
    return mask_from_keys(_uniform((batch, n), generator, device), counts)


def block_mask(batch: int, grid: tuple[int, int], counts: torch.Tensor | int, generator=None,
               device: torch.device | str = "cpu", min_patches: int = 16, min_aspect: float = 0.3,
               attempts: int = 64) -> torch.Tensor:
    """BEiT block-wise masking: rectangles of ≥ ``min_patches`` patches with aspect ratio in
    ``[min_aspect, 1/min_aspect]``, added while they fit the count, then trimmed or topped up at
    random to exactly the count. Each attempt places one candidate block in every image at once.

    The attempts' numbers are drawn in one call and the attempts run in NumPy on the host; only
    the finished mask moves to ``device``. Why: dozens of attempts of tiny tensor operations cost
    more in per-operation overhead than in arithmetic (on a GPU, each also ended in a host sync: a
    tenth of a ViT-L step), and this way the mask is the same on every device."""
    gh, gw = grid
    n = gh * gw
    want = _as_counts(counts, torch.empty(batch, 0)).cpu()
    draws = _uniform((attempts, 4, batch), generator, "cpu").double().numpy()
    remaining = want.numpy().astype(np.int64)
    rows, cols = np.arange(gh)[None, :, None], np.arange(gw)[None, None, :]
    mask = np.zeros((batch, gh, gw), dtype=bool)
    lo_ar, hi_ar = math.log(min_aspect), math.log(1 / min_aspect)
    for u in draws:
        if not (remaining > 0).any():
            break
        rem = np.maximum(remaining, 1).astype(np.float64)
        low = np.minimum(rem, min_patches)
        area = low + u[0] * (rem - low)
        aspect = np.exp(lo_ar + u[1] * (hi_ar - lo_ar))
        h = np.clip(np.round(np.sqrt(area * aspect)), 1, gh).astype(np.int64)
        w = np.clip(np.round(np.sqrt(area / aspect)), 1, gw).astype(np.int64)
        top = (u[2] * (gh - h + 1)).astype(np.int64)[:, None, None]
        left = (u[3] * (gw - w + 1)).astype(np.int64)[:, None, None]
        rect = ((rows >= top) & (rows < top + h[:, None, None])
                & (cols >= left) & (cols < left + w[:, None, None]))
        new = (rect & ~mask).reshape(batch, -1).sum(1)
        accept = (remaining > 0) & (new > 0) & (new <= remaining)
        mask |= rect & accept[:, None, None]
        remaining -= np.where(accept, new, 0)
    keys = torch.from_numpy(mask.reshape(batch, n)).float() * 2 + _uniform((batch, n), generator, "cpu")
    return to_device(mask_from_keys(keys, want), device)


def select(name: str, scores: torch.Tensor | None, counts: torch.Tensor, generator=None, *,
           grid: tuple[int, int] | None = None, width: float = 0.5, batch: int | None = None,
           device=None) -> torch.Tensor:
    """Dispatch by selector name; ``scores`` are probabilities for ``sample``, ignored by
    ``random`` and ``block``."""
    if name == "topk":
        return topk_mask(scores, counts)
    if name == "sample":
        return sample_mask(scores, counts, generator)
    if name == "noisy_topk":
        return noisy_topk_mask(scores, counts, width, generator)
    batch = batch if batch is not None else counts.shape[0]
    device = device if device is not None else counts.device
    if name == "random":
        n = grid[0] * grid[1]
        return mask_from_keys(_uniform((batch, n), generator, device), counts.to(device))
    if name == "block":
        return block_mask(batch, grid, counts, generator, device)
    raise ValueError(f"unknown selector {name!r}; valid: {', '.join(SELECTORS)}")


def _as_counts(counts: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    if isinstance(counts, int):
        return torch.full((like.shape[0],), counts, dtype=torch.long, device=like.device)
    return counts.to(like.device)
