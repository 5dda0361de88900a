"""ViT building blocks whose parameter names match timm's ``VisionTransformer``.

Names (``patch_embed.proj``, ``attn.qkv``, ``mlp.fc1`` ...) are kept identical to timm and to the
official MAE checkpoints so weights move between the three without any key renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from . import packed
from .packed import Segments


def to_2tuple(x: int | Sequence[int]) -> tuple[int, int]:
    """``224 -> (224, 224)``; a pair is returned as a tuple of ints."""
    if isinstance(x, int):
        return (x, x)
    h, w = x
    return (int(h), int(w))


class PatchEmbed(nn.Module):
    """Image to patch tokens: ``[B, C, H, W] -> [B, N, D]`` with N = (H/p)(W/p), row-major."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(
                f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}"
            )
        self.grid_size = (self.img_size[0] // self.patch_size[0],
                          self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size,
                              stride=self.patch_size)

    def grid_for(self, x: torch.Tensor) -> tuple[int, int]:
        """The patch grid of images ``x`` (any size divisible by the patch size: a resolution
        phase trains at other sizes than ``img_size``, the size the position table is built for)."""
        (h, w), (ph, pw) = x.shape[-2:], self.patch_size
        if h % ph or w % pw:
            raise ValueError(f"input size {(h, w)} is not divisible by patch_size {self.patch_size}")
        return (h // ph, w // pw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grid_for(x)
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, gh, gw] -> [B, N, D]


class Attention(nn.Module):
    """Multi-head self-attention; ``qk`` exposes q, k for mask scoring without a second forward."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, D] -> [3, B, h, T, d]``."""
        B, T, _ = x.shape
        return self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled q, k, each ``[B, h, T, d]`` (timm layout), without running attention."""
        qkv = self._qkv(x)
        return qkv[0], qkv[1]

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                segments: Segments | None = None):
        """``x [B, T, D] -> [B, T, D]``; ``key_padding_mask [B, T]`` True = padded, never a key.
        With ``segments``, ``x`` is packed ``[T, D]`` and each image attends to itself only."""
        if segments is not None:
            T, D = x.shape
            q, k, v = self.qkv(x).reshape(T, 3, self.num_heads, self.head_dim).unbind(1)
            return self.proj(packed.attention(q, k, v, segments).reshape(T, D))
        B, T, D = x.shape
        q, k, v = self._qkv(x).unbind(0)
        attn_mask = None
        if key_padding_mask is not None:
            attn_mask = ~key_padding_mask.to(torch.bool)[:, None, None, :]  # True = may attend
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """Two-layer feed-forward with GELU: ``[..., D] -> [..., D]``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block, LayerNorm eps 1e-6 as timm / MAE: ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                segments: Segments | None = None):
        if segments is not None:  # packed [T, D]: stochastic depth per image, not per row
            prob = getattr(self.drop_path, "drop_prob", 0.0)
            x = x + packed.drop_path(self.attn(self.norm1(x), segments=segments), prob, segments, self.training)
            return x + packed.drop_path(self.mlp(self.norm2(x)), prob, segments, self.training)
        x = x + self.drop_path(self.attn(self.norm1(x), key_padding_mask=key_padding_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def resample_positions(rows: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """The patch rows ``[1, gh*gw, D]`` of a position table at another grid ``[1, gh'*gw', D]``:
    bicubic, antialiased when shrinking, in float32 (timm's rule for a new input size). At the
    table's own grid, the rows themselves."""
    if tuple(new_grid) == tuple(grid):
        return rows
    dim = rows.shape[-1]
    x = rows.float().reshape(1, *grid, dim).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).reshape(1, -1, dim).to(rows.dtype)


def patch_positions(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``encoder.pos_embed``'s patch rows for the grid of ``images`` ([1, N, D]); ``encoder`` has
    ViT parts under timm names (``patch_embed``, ``pos_embed`` with a CLS row)."""
    embed = encoder.patch_embed
    return resample_positions(encoder.pos_embed[:, 1:], embed.grid_size, embed.grid_for(images))


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """Positions ``[M]`` -> ``[M, embed_dim]``: sin in the first half, cos in the second."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | Sequence[int],
                            cls_token: bool = False) -> np.ndarray:
    """Fixed 2-D sin-cos table ``[(1 if cls_token) + gh*gw, embed_dim]``, float64 like MAE.

    Numerically the official MAE formula: the first D/2 channels encode the column (w) index,
    the last D/2 the row (h) index (MAE names them the other way round); a CLS row is all zeros.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for 2-D sin-cos")
    gh, gw = to_2tuple(grid_size)
    col, row = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    emb = np.concatenate([_sincos_1d(embed_dim // 2, col), _sincos_1d(embed_dim // 2, row)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb
