"""GPA's masked attention modeling (SPEC §3, eq. 7–8): predict the teacher's GPA per patch.

The target is the chosen head's GPA, z-scored per image. ``MAMHead`` is a linear head on the shared
decoder trunk (loss over hidden patches, MAE's parameter count [S]); ``MAMDecoder`` is the official
code's second decoder (loss over all patches, switched on late in training [C]).
"""

from __future__ import annotations

import torch
from torch import nn

from mimscale.pretrain.models.vit import Block, resample_positions


def zscore(g: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-image z-score of ``[B, N]`` (population std), in float32."""
    g = g.float()
    return (g - g.mean(-1, keepdim=True)) / (g.std(-1, unbiased=False, keepdim=True) + eps)


def mam_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of ``pred [B, N]`` against the z-scored ``target``, over ``mask``ed patches (all if None)."""
    err = (pred.float() - zscore(target)) ** 2
    if mask is None:
        return err.mean()
    m = mask.float()
    return (err * m).sum() / m.sum().clamp_min(1.0)


class MAMHead(nn.Module):
    """Linear GPA head on the decoder trunk: ``[B, N, Dd] -> [B, N]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1)


class MAMDecoder(nn.Module):
    """A second MAE-style decoder predicting GPA from the encoder's visible tokens: ``[B, N]``."""

    def __init__(self, student: nn.Module, dim: int = 512, depth: int = 8, num_heads: int = 16):
        super().__init__()
        enc_dim = student.cls_token.shape[-1]
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.pos_embed = nn.Parameter(torch.zeros(1, student.num_patches + 1, dim), requires_grad=False)
        from mimscale.pretrain.models.vit import get_2d_sincos_pos_embed

        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(dim, student.grid_size, True)).float()[None])
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, 1)
        self._slots, self._grid, self.grid = student.visible_slots, student.token_grid, tuple(student.grid_size)

    def forward(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ids, pad = self._slots(mask, width=latent.shape[1] - 1)  # the latent's slots: no host read
        x = self.embed(latent)
        B, _, D = x.shape
        n = mask.shape[1]
        target = torch.where(pad, torch.full_like(ids, n), ids)
        full = self.mask_token.to(x.dtype).expand(B, n + 1, D)
        full = torch.scatter(full, 1, target.unsqueeze(-1).expand(-1, -1, D), x[:, 1:])[:, :n]
        pos = torch.cat([self.pos_embed[:, :1], resample_positions(self.pos_embed[:, 1:], self.grid, self._grid(n))], 1)
        x = torch.cat([x[:, :1], full], dim=1) + pos
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:].squeeze(-1)
