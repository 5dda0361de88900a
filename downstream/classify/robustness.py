"""Robustness of a fine-tuned ViT (Conditional MAE, seed 004 A.5): half of the patches occluded,
or the patches shuffled.

Occlusion drops patch tokens after the position embedding (iBOT's protocol, which A.5 follows): the
model sees ``int(N·(1−ratio))`` randomly chosen patches at their true positions, plus CLS. Shuffling
permutes the patches' contents before the position embedding is added, which is exactly shuffling
the image's patch-sized tiles.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from mimscale.pretrain.masking.functional import num_visible

PERTURBATIONS = ("occlude", "shuffle")


def _random_order(batch: int, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(batch, n, generator=generator).argsort(dim=1).to(device)


def _take(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def perturbed_forward(vit: VisionTransformer, images: torch.Tensor, perturbation: str,
                      ratio: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logits of ``vit`` on perturbed ``images``; the random draw comes from ``generator`` (CPU)."""
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation {perturbation!r} is not valid; valid: {', '.join(PERTURBATIONS)}")
    if vit.num_prefix_tokens != 1 or not vit.has_class_token:
        raise ValueError("perturbed_forward expects a ViT with one CLS token and no register tokens")
    x = vit.patch_embed(images)
    batch, n, _ = x.shape
    if perturbation == "shuffle":
        x = _take(x, _random_order(batch, n, generator, x.device))
    x = vit._pos_embed(x)  # CLS first, position table added
    if perturbation == "occlude":
        keep = _random_order(batch, n, generator, x.device)[:, :num_visible(n, ratio)]
        x = torch.cat([x[:, :1], _take(x[:, 1:], keep.sort(dim=1).values)], dim=1)
    x = vit.norm(vit.blocks(vit.norm_pre(x)))
    return vit.forward_head(x)
