"""Selectors turn scores into bool masks ``[B, N]`` (True = hidden), SPEC §1.

Every selector is an ordering of the patches (highest key = hidden first) cut at each image's own
count, so per-image counts may differ (AMR) and the batch is handled at once, without a Python loop
over images. Ties are broken by patch index (stable sort), so a seed fixes the result.
"""

from __future__ import annotations

import math

import torch

from .functional import gumbel_keys, num_visible

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
    return torch.rand(shape, generator=generator, device=dev).to(device)


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

    The attempts run where the generator's numbers are drawn (the CPU by default) and only the
    finished mask moves to ``device``: on a GPU, dozens of attempts of tiny kernels, each ending in
    a host sync, cost more than a ViT-L step's fifth, and the mask is the same on every device."""
    out_device, device = device, (generator.device if generator is not None else device)
    gh, gw = grid
    n = gh * gw
    counts = _as_counts(counts, torch.empty(batch, n, device=device))
    rows = torch.arange(gh, device=device).view(1, gh, 1)
    cols = torch.arange(gw, device=device).view(1, 1, gw)
    mask = torch.zeros(batch, gh, gw, dtype=torch.bool, device=device)
    lo_ar, hi_ar = math.log(min_aspect), math.log(1 / min_aspect)
    for _ in range(attempts):
        remaining = counts - mask.flatten(1).sum(1)
        if not bool((remaining > 0).any()):
            break
        u = _uniform((4, batch), generator, device)
        rem = remaining.clamp_min(1).float()
        low = rem.clamp(max=min_patches)
        area = low + u[0] * (rem - low)
        aspect = torch.exp(lo_ar + u[1] * (hi_ar - lo_ar))
        h = torch.round(torch.sqrt(area * aspect)).long().clamp(1, gh)
        w = torch.round(torch.sqrt(area / aspect)).long().clamp(1, gw)
        top = (u[2] * (gh - h + 1)).long()
        left = (u[3] * (gw - w + 1)).long()
        rect = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
                & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))
        new = (rect & ~mask).flatten(1).sum(1)
        accept = (remaining > 0) & (new > 0) & (new <= remaining)
        mask |= rect & accept.view(-1, 1, 1)
    keys = mask.flatten(1).float() * 2 + _uniform((batch, n), generator, device)
    return mask_from_keys(keys, counts).to(out_device)


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
