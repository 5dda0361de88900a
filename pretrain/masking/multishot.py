"""Multi-shot masking inside the encoder (SPEC §6, Conditional MAE).

Shot 1 is the input mask. A later shot at layer ``j`` acts on the output of block ``j−1``: it keeps
``int(K·(1−η))`` of each image's still-visible patch tokens (never CLS) and the rest join the
reconstruction target. Its choice is random [P] or guided [X] by a no-grad score from the q, k that
block ``j`` computes from its input — one extra q, k projection, no extra forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mimscale.pretrain.models.packed import Segments

from . import functional as F
from .functional import to_device
from .selectors import mask_from_keys


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

    def _choose(self, layer: int, blk: nn.Module, x: torch.Tensor, ids: torch.Tensor, pad: torch.Tensor,
                num_patches: int, generator: torch.Generator | None):
        """Kept counts ``[B]``, the slot order (kept slots first, ascending patch) and the patches
        this shot hides ``[B, N]``, all on the device."""
        ratio, guide = self.shots[layer]
        current = (~pad).sum(dim=1)
        keep = torch.floor(current.double() * (1 - ratio)).long()
        dropped = mask_from_keys(self._keys(guide, blk, x, pad, generator), current - keep)
        kept = ~pad & ~dropped
        order = torch.argsort(torch.where(kept, ids, ids + num_patches), dim=1, stable=True)
        hidden = torch.zeros(ids.shape[0], num_patches, dtype=torch.bool, device=ids.device)
        hidden.scatter_(1, ids, dropped)
        return keep, order, hidden

    def keep_counts(self, layer: int, counts: list[int]) -> list[int]:
        """The counts ``_choose`` keeps, computed on the host from the host's counts (same float64
        arithmetic as the device's, so no host read is needed)."""
        ratio = self.shots[layer][0]
        return [math.floor(c * (1 - ratio)) for c in counts]

    def apply(self, layer: int, blk: nn.Module, x: torch.Tensor, ids: torch.Tensor, pad: torch.Tensor,
              num_patches: int, generator: torch.Generator | None):
        """Drop tokens before ``blk``: returns new ``x [B, 1+K', D]``, ``ids``, ``pad`` and the
        patches this shot hid ``[B, N]``."""
        keep, order, hidden = self._choose(layer, blk, x, ids, pad, num_patches, generator)
        width = int(keep.max()) if keep.numel() else 0
        sel = order[:, :width]
        new_ids = ids.gather(1, sel)
        new_pad = torch.arange(width, device=ids.device)[None, :] >= keep[:, None]
        tokens = x[:, 1:].gather(1, sel.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], tokens], dim=1), new_ids, new_pad, hidden

    def apply_packed(self, layer: int, blk: nn.Module, x: torch.Tensor, seg: Segments, ids: torch.Tensor,
                     pad: torch.Tensor, num_patches: int, generator: torch.Generator | None):
        """:meth:`apply` on a packed ``x [T, D]`` (``models.packed``): the same choice, returned as
        the packed rows kept, their new :class:`Segments`, ``ids``, ``pad`` and the hidden patches."""
        keep, order, hidden = self._choose(layer, blk, seg.pad(x.detach()), ids, pad, num_patches, generator)
        lengths = self.keep_counts(layer, [n - 1 for n in seg.lengths])
        width = max(lengths, default=0)
        sel = order[:, :width]
        new_pad = torch.arange(width, device=ids.device)[None, :] >= keep[:, None]
        new = Segments.of([n + 1 for n in lengths], keep + 1, seg.kernel)
        slots = torch.cat([sel.new_zeros(sel.shape[0], 1), 1 + sel], dim=1) + seg.offsets[:-1, None]
        return x[new.rows(slots)], new, ids.gather(1, sel), new_pad, hidden
