"""Multi-shot masking inside the encoder (SPEC §6, Conditional MAE).

Shot 1 is the input mask. A later shot at layer ``j`` acts on the output of block ``j−1``: it keeps
``int(K·(1−η))`` of each image's still-visible patch tokens (never CLS) and the rest join the
reconstruction target. Its choice is random [P] or guided [X] by a no-grad score from the q, k that
block ``j`` computes from its input — one extra q, k projection, no extra forward.
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from .selectors import mask_from_keys, to_device


def resolve_layer(layer: int | float, depth: int) -> int:
    """A block index, or a fraction of depth: 10/12 of ViT-B's 12 blocks is block 20 of ViT-L's 24."""
    index = int(layer) if float(layer) >= 1 else round(layer * depth)
    if not 1 <= index < depth:
        raise ValueError(f"shot layer {layer} resolves to block {index}, outside 1..{depth - 1}")
    return index


class ShotPlan:
    """Later shots keyed by the block they act before: ``{layer: (ratio, guide)}``."""

    def __init__(self, shots, depth: int):
        self.shots = {resolve_layer(s.layer, depth): (s.ratio, s.guide) for s in shots}
        self.layers = set(self.shots)
        self.ratios = [self.shots[j][0] for j in sorted(self.shots)]

    @torch.no_grad()
    def _keys(self, guide: str, blk: nn.Module, x: torch.Tensor, pad: torch.Tensor, generator) -> torch.Tensor:
        """Drop priority per slot ``[B, Kslots]`` (highest dropped first); padding never dropped."""
        B, slots = pad.shape
        if guide == "random":
            keys = to_device(torch.rand(B, slots, generator=generator), x.device)
        else:
            q, k = blk.attn.qk(blk.norm1(x))
            valid = torch.cat([torch.ones_like(pad[:, :1]), ~pad], dim=1)[:, None, :, None]
            q = q * valid  # padded queries contribute nothing to GPA's sums
            if guide == "gpa":
                keys = F.global_patch_attention(q, k).sum(dim=1)
            else:  # CLS attention logits, head mean: softmax ranks the same
                keys = (q[:, :, :1].float() @ k[:, :, 1:].float().transpose(-2, -1)).squeeze(2).mean(1)
        return keys.float().masked_fill(pad, float("-inf"))

    def apply(self, layer: int, blk: nn.Module, x: torch.Tensor, ids: torch.Tensor, pad: torch.Tensor,
              num_patches: int, generator: torch.Generator | None):
        """Drop tokens before ``blk``: returns new ``x [B, 1+K', D]``, ``ids``, ``pad`` and the
        patches this shot hid ``[B, N]``."""
        ratio, guide = self.shots[layer]
        current = (~pad).sum(dim=1)
        keep = torch.floor(current.double() * (1 - ratio)).long()
        dropped = mask_from_keys(self._keys(guide, blk, x, pad, generator), current - keep)
        kept = ~pad & ~dropped
        # kept slots first, in ascending patch order, then the rest
        order = torch.argsort(torch.where(kept, ids, ids + num_patches), dim=1, stable=True)
        width = int(keep.max()) if keep.numel() else 0
        sel = order[:, :width]
        new_ids = ids.gather(1, sel)
        new_pad = torch.arange(width, device=ids.device)[None, :] >= keep[:, None]
        tokens = x[:, 1:].gather(1, sel.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        hidden = torch.zeros(ids.shape[0], num_patches, dtype=torch.bool, device=ids.device)
        hidden.scatter_(1, ids, dropped)
        return torch.cat([x[:, :1], tokens], dim=1), new_ids, new_pad, hidden
