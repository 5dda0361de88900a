"""The pure mathematical core of masking (SPEC §8): no module state, batch-first, any float dtype.

Scores are computed in float32 whatever the input precision (SPEC §1). ``q, k`` are ``[B, h, 1+N, d]``
with the CLS token first (timm's layout); ``N`` is the number of patch tokens.
"""

from __future__ import annotations

import math

import torch


def num_visible(n: int, ratio: float) -> int:
    """Visible patches K = int(n·(1−ratio)), floored exactly as MAE computes it (49 of 196 at 0.75)."""
    return int(n * (1 - ratio))


def cls_patch_attention(q: torch.Tensor, k: torch.Tensor, include_cls_key: bool = False) -> torch.Tensor:
    """Per-head CLS→patch attention ``[B, h, N]`` (SPEC §2, §4).

    By default the softmax runs over the N patch keys only; with ``include_cls_key`` it runs over
    all 1+N keys (as ccMIM's code reads the attention matrix) and the patch columns are returned.
    """
    q, k = q.float(), k.float()
    logits = (q[:, :, :1] @ k.transpose(-2, -1)).squeeze(2) / math.sqrt(q.shape[-1])  # [B, h, 1+N]
    if include_cls_key:
        return logits.softmax(dim=-1)[..., 1:]
    return logits[..., 1:].softmax(dim=-1)


def cls_importance(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """ccMIM importance, eq. 4: ``softmax_i(mean_h(q_CLS·k_i) / √d)`` over patches, ``[B, N]``."""
    q, k = q.float(), k.float()
    logits = (q[:, :, :1] @ k[:, :, 1:].transpose(-2, -1)).squeeze(2)  # [B, h, N]
    return (logits.mean(dim=1) / math.sqrt(q.shape[-1])).softmax(dim=-1)


def global_patch_attention(q: torch.Tensor, k: torch.Tensor, queries: str = "patches") -> torch.Tensor:
    """GPA logit sums, eq. 5, ``[B, h, N]``: how much attention patch ``m`` receives before softmax.

    ``patches``: ``Σ_{i∈patches, i≠m} q_i·k_m / √d``, computed as ``k_m·(Σ_i q_i − q_m) / √d`` in
    O(N·d) with no N×N matrix. ``all``: every query, CLS and self included (GPA's code).
    """
    q, k = q.float(), k.float()
    scale = 1.0 / math.sqrt(q.shape[-1])
    k_patch = k[:, :, 1:]
    if queries == "patches":
        q_patch = q[:, :, 1:]
        total = q_patch.sum(dim=2, keepdim=True)                    # [B, h, 1, d]
        return ((total - q_patch) * k_patch).sum(-1) * scale
    if queries == "all":
        return (k_patch @ q.sum(dim=2).unsqueeze(-1)).squeeze(-1) * scale
    raise ValueError(f"queries must be 'patches' or 'all', got {queries!r}")


def _salience_raw(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Column sums of the row-softmaxed affinity ``X Xᵀ`` (eq. 3–4) before normalisation."""
    x = x.float()
    a = x @ x.transpose(-2, -1)
    if scale is not None:
        a = a * scale
    return a.softmax(dim=-1).sum(dim=-2)


def salience_range(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``max S − min S`` per image before normalisation; below 1e-6 the salience is degenerate."""
    s = _salience_raw(x, scale)
    return s.amax(dim=-1) - s.amin(dim=-1)


def token_salience(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """SBAM token salience (eq. 3–4), ``[B, N]`` in [0, 1].

    ``A = X Xᵀ`` (times ``scale`` when given, e.g. 1/√D), ``Â = row-softmax(A)``, ``S_i = Σ_j Â_ji``,
    then per-image min–max normalisation. A flat row (range < 1e-6) maps to zeros.
    """
    s = _salience_raw(x, scale)
    lo, hi = s.amin(dim=-1, keepdim=True), s.amax(dim=-1, keepdim=True)
    rng = hi - lo
    return torch.where(rng > 1e-6, (s - lo) / rng.clamp_min(1e-12), torch.zeros_like(s))


def adaptive_mask_ratio(salience: torch.Tensor, base_ratio: float = 0.75, delta_r: float = 0.15,
                        threshold: float = 0.1) -> torch.Tensor:
    """AMR, eq. 7: ``R = r − Δr + 2Δr · mean_i 1[S_i > δ]`` per image, ``[B]``."""
    frac = (salience.float() > threshold).float().mean(dim=-1)
    return base_ratio - delta_r + 2 * delta_r * frac


def soft_to_hard_fractions(progress: float, soft: tuple[float, float] = (0.5, 0.0),
                           hard: tuple[float, float] = (0.0, 0.5)) -> tuple[float, float, float]:
    """GPA's soft-to-hard schedule, eq. 6: ``(α_s, α_h, α_r)`` at training progress in [0, 1]."""
    a_s = soft[0] + progress * (soft[1] - soft[0])
    a_h = hard[0] + progress * (hard[1] - hard[0])
    return a_s, a_h, 1.0 - a_s - a_h


def plb_update(p: torch.Tensor, head_losses: torch.Tensor, lam: float = 0.99, eps: float = 0.2) -> torch.Tensor:
    """Pattern-learning balance, eq. 4: ``p ← (1−λ)·p + λ·softmax(L/ε)``, ``[h]``."""
    return (1 - lam) * p.float() + lam * (head_losses.float() / eps).softmax(dim=-1)


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """``x``, drawn on the host (where the step's generator lives), on ``device`` without a host
    sync: a copy to a GPU goes through pinned memory, asynchronously (a pageable copy blocks)."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.contiguous().pin_memory().to(device, non_blocking=True)  # pinning copies: no expanded views
    return x.to(device)


def gumbel_keys(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``log π + Gumbel`` keys: sorting them descending is sequential sampling without replacement."""
    u = torch.rand(probs.shape, generator=generator, device=generator.device if generator else probs.device)
    u = to_device(u, probs.device).clamp_(1e-20, 1.0 - 1e-7)
    return probs.float().log() - (-u.log()).log()


def sample_without_replacement(probs: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B, k]`` indices drawn without replacement with probability ∝ ``probs`` (Gumbel-top-k).

    Zero-probability entries get key −inf, so they are never drawn while others remain.
    """
    return gumbel_keys(probs, generator).topk(k, dim=-1).indices
