"""No-grad passes of an encoder that produce what the scorers need, and nothing more.

An "encoder" is anything with ViT parts under timm / MAE names: ``patch_embed``, ``cls_token``,
``pos_embed`` (with a CLS row) and ``blocks`` — the student MAE, or a teacher. The passes run the full
image (no mask), use the fused attention kernel in every block they run, stop at the block that
produces the score, and read that block's q, k without forming attention probabilities anywhere else.
"""

from __future__ import annotations

import torch
from torch import nn

from mimscale.pretrain.models.vit import patch_positions


def input_tokens(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding + positional embedding, ``[B, N, D]``, CLS excluded (SBAM's X)."""
    return encoder.patch_embed(images) + patch_positions(encoder, images)


def _with_cls(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    cls = (encoder.cls_token + encoder.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    return torch.cat([cls.to(x.dtype), x], dim=1)


def resolve_block(encoder: nn.Module, block: int) -> int:
    """The index of ``block`` (negative: from the end of the whole network, also for a teacher
    truncated after its scoring block, which records its ``full_depth``)."""
    depth = getattr(encoder, "full_depth", len(encoder.blocks))
    index = block + depth if block < 0 else block
    if not 0 <= index < len(encoder.blocks):
        raise ValueError(f"scoring block {block} is outside the encoder's {len(encoder.blocks)} blocks "
                         f"(of {depth})")
    return index


@torch.no_grad()
def block_qk(encoder: nn.Module, images: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k ``[B, h, 1+N, d]`` of ``block`` on the full image; runs only the blocks before it."""
    index = resolve_block(encoder, block)
    x = _with_cls(encoder, input_tokens(encoder, images))
    for blk in encoder.blocks[:index]:
        x = blk(x)
    target = encoder.blocks[index]
    return target.attn.qk(target.norm1(x))


@torch.no_grad()
def cls_attention_all_blocks(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """ccMIM's code score: Σ over blocks of the head-mean CLS row (softmax over all 1+N keys),
    patch columns kept, ``[B, N]``. Each block still runs fused; only the CLS row is formed."""
    from .functional import cls_patch_attention

    x = _with_cls(encoder, input_tokens(encoder, images))
    total = None
    for blk in encoder.blocks:
        q, k = blk.attn.qk(blk.norm1(x))
        row = cls_patch_attention(q, k, include_cls_key=True).mean(dim=1)
        total = row if total is None else total + row
        x = blk(x)
    return total
