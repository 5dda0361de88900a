"""A pretrained ViT as a dense backbone (ViTDet, Li et al. 2022; BEiT/MAE UperNet).

Dense tasks feed images far larger than the pretraining crop, so the encoder here differs from the
pretraining one in three ways only: the position table is resized to the input's patch grid on
every forward, most blocks attend inside non-overlapping windows (a few stay global), and the CLS
token is dropped. Parameter names are the encoder's (timm / official MAE layout), so a pretrained
state dict loads without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimscale.pretrain.models.factory import MODEL_SIZES
from mimscale.pretrain.models.vit import Block, get_2d_sincos_pos_embed


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], has_cls: bool = True) -> torch.Tensor:
    """Bicubic resize of a ``[1, (1) + gh*gw, D]`` position table to ``grid``; the CLS row (if any)
    is kept as is. The source grid must be square (as every pretraining table is)."""
    cls, patch = (pos[:, :1], pos[:, 1:]) if has_cls else (pos[:, :0], pos)
    side = round(patch.shape[1] ** 0.5)
    if side * side != patch.shape[1]:
        raise ValueError(f"position table of {patch.shape[1]} patches is not a square grid")
    if (side, side) == tuple(grid):
        return pos
    table = patch.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    table = table.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([cls, table], dim=1)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """``[B, H, W, D]`` -> windows ``[B*nW, window², D]`` and their key padding ``[B*nW, window²]``
    (True = a slot added to reach a multiple of ``window``); every window keeps a real token."""
    B, H, W, D = x.shape
    ph, pw = (-H) % window, (-W) % window
    x = F.pad(x, (0, 0, 0, pw, 0, ph))
    pad = torch.zeros(H + ph, W + pw, dtype=torch.bool, device=x.device)
    pad[H:, :], pad[:, W:] = True, True
    Hp, Wp = H + ph, W + pw
    x = x.view(B, Hp // window, window, Wp // window, window, D).permute(0, 1, 3, 2, 4, 5)
    pad = pad.view(Hp // window, window, Wp // window, window).permute(0, 2, 1, 3)
    pad = pad.reshape(1, -1, window * window).expand(B, -1, -1).reshape(-1, window * window)
    return x.reshape(-1, window * window, D), pad, (H, W, Hp, Wp)


def window_unpartition(windows: torch.Tensor, window: int, shape: tuple, batch: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B*nW, window², D] -> [B, H, W, D]``."""
    H, W, Hp, Wp = shape
    x = windows.view(batch, Hp // window, Wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, Hp, Wp, -1)
    return x[:, :H, :W]


def default_global_blocks(depth: int) -> list[int]:
    """ViTDet's choice: the last block of each quarter of the depth attends globally."""
    return [(i + 1) * depth // 4 - 1 for i in range(4)]


class ViTBackbone(nn.Module):
    """ViT patch features ``[B, D, H/p, W/p]`` from the blocks in ``out_indices``.

    ``window_size`` (in patches; 0 = all global) applies to every block not in ``global_blocks``.
    Padded window slots are masked out of the keys, so padding never changes a real token.
    """

    def __init__(self, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, in_chans: int = 3,
                 pretrain_img_size: int = 224, drop_path: float = 0.1, window_size: int = 14,
                 global_blocks: Sequence[int] | None = None,
                 out_indices: Sequence[int] | None = None, activation_checkpointing: bool = False):
        super().__init__()
        if pretrain_img_size % patch_size:
            raise ValueError(f"pretrain_img_size {pretrain_img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.window_size = window_size
        self.global_blocks = sorted(default_global_blocks(depth) if global_blocks is None else global_blocks)
        self.out_indices = list(out_indices) if out_indices is not None else [depth - 1]
        for name, idx in (("global_blocks", self.global_blocks), ("out_indices", self.out_indices)):
            bad = [i for i in idx if not 0 <= i < depth]
            if bad:
                raise ValueError(f"{name} {bad} are not block indices; valid: 0..{depth - 1}")
        self.activation_checkpointing = activation_checkpointing
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        grid = pretrain_img_size // patch_size
        # Learnable (as in ViTDet); initialised with MAE's sin-cos table so training from scratch works.
        table = torch.from_numpy(get_2d_sincos_pos_embed(embed_dim, grid, cls_token=True)).float()
        self.pos_embed = nn.Parameter(table.unsqueeze(0))
        dpr = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i])
                                    for i in range(depth))

    @classmethod
    def from_name(cls, name: str, patch_size: int | None = None, **kwargs) -> ViTBackbone:
        """``ViTBackbone.from_name('mae_vit_base_patch16', window_size=14)``: a named model size."""
        if name not in MODEL_SIZES:
            raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_SIZES)}")
        arch = dict(MODEL_SIZES[name])
        if patch_size is not None:
            arch["patch_size"] = patch_size
        return cls(**arch, **kwargs)

    @property
    def num_layers(self) -> int:
        return self.depth

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i`` on ``[B, H, W, D]``; only its attention is windowed (norms, MLP and drop
        path are per token or per image, so they see the whole map)."""
        blk = self.blocks[i]
        B, H, W, D = x.shape
        y = blk.norm1(x)
        if self.window_size > 0 and i not in self.global_blocks:
            windows, pad, shape = window_partition(y, self.window_size)
            y = window_unpartition(blk.attn(windows, key_padding_mask=pad if pad.any() else None),
                                   self.window_size, shape, B)
        else:
            y = blk.attn(y.reshape(B, H * W, D)).view(B, H, W, D)
        x = x + blk.drop_path(y)
        return x + blk.drop_path(blk.mlp(blk.norm2(x)))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``[B, 3, H, W]`` (H, W multiples of the patch size) -> one ``[B, D, H/p, W/p]`` map per
        entry of ``out_indices``."""
        H, W = images.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input size {(H, W)} is not a multiple of the patch size {self.patch_size}; "
                             "pad the images first")
        x = self.patch_embed.proj(images).permute(0, 2, 3, 1)  # [B, h, w, D]
        h, w = x.shape[1:3]
        x = x + resize_pos_embed(self.pos_embed, (h, w))[:, 1:].reshape(1, h, w, -1).to(x.dtype)
        outs = []
        for i in range(self.depth):
            if self.activation_checkpointing and self.training:
                x = checkpoint(self._block, i, x, use_reentrant=False)
            else:
                x = self._block(i, x)
            if i in self.out_indices:
                outs.append(x.permute(0, 3, 1, 2).contiguous())
        return outs
