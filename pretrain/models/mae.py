"""Masked autoencoder (He et al. 2022) driven by an explicit boolean mask.

The official MAE draws its random mask inside ``forward``; here the caller passes the mask, so every
masking strategy (random, block, guided, multi-shot) feeds the same model. Parameter names and
initialisation follow the official pretraining checkpoints exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .packed import Segments, resolve_varlen
from .vit import Block, PatchEmbed, get_2d_sincos_pos_embed, patch_positions, resample_positions


class MAEOutput(NamedTuple):
    """``loss`` scalar; ``pred [B, N, p*p*C]``; ``mask [B, N]`` (True = hidden, the union of all
    shots); ``loss_per_image [B]``; ``loss_per_patch [B, N]``; ``shot_masks``: what each shot hid;
    ``latent`` and ``decoder_features`` for the objectives that read them."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    loss_per_image: torch.Tensor
    loss_per_patch: torch.Tensor | None = None
    shot_masks: list | None = None
    latent: torch.Tensor | None = None            # encoder output [B, 1+K, D], CLS first
    decoder_features: torch.Tensor | None = None  # decoder trunk [B, N, Dd]


class Encoded(NamedTuple):
    """Encoder output: ``latent [B, 1+Kmax, D]``, patch index of each slot ``ids [B, Kmax]``,
    padding ``pad [B, Kmax]``, the final hidden ``mask [B, N]`` and each shot's hidden patches."""

    latent: torch.Tensor
    ids: torch.Tensor
    pad: torch.Tensor
    mask: torch.Tensor
    shot_masks: list


def _with_cls(pad: torch.Tensor) -> torch.Tensor | None:
    """Key padding for ``[CLS, slots…]``; None when nothing is padded (keeps the fused kernel)."""
    if not bool(pad.any()):
        return None
    return torch.cat([torch.zeros_like(pad[:, :1]), pad], dim=1)


class MaskedAutoencoderViT(nn.Module):
    """ViT encoder on the visible tokens + light transformer decoder predicting every patch."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_pix_loss=True, drop_path=0.0):
        super().__init__()
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        # Fixed sin-cos tables are Parameters (requires_grad=False) so they sit in the state dict
        # under the same keys as the official checkpoints and timm.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim), requires_grad=False)
        dpr = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i])
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * in_chans, bias=True)
        # How the encoder runs images of unequal visible counts (``models.packed``): a plain
        # attribute, not a parameter, so the state dict is the same whatever it is.
        self.varlen = "padded"
        self.initialize_weights()

    # ----------------------------------------------------------------------------------- init
    def initialize_weights(self) -> None:
        """Official MAE init: sin-cos tables, xavier Linear/patch conv, N(0, .02) tokens."""
        grid = self.grid_size
        pe = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        dpe = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(dpe).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the flattened patch
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------ geometry
    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def token_grid(self, n: int) -> tuple[int, int]:
        """The patch grid of ``n`` tokens: the built grid, or the square grid of a resolution
        phase (square images at another size than ``img_size``)."""
        if n == self.num_patches:
            return self.grid_size
        side = math.isqrt(n)
        if side * side != n or self.grid_size[0] != self.grid_size[1]:
            raise ValueError(f"{n} patches are not a grid this model runs at (built for {self.grid_size})")
        return (side, side)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "mask_token", "decoder_pos_embed"}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, N, p*p*C]``, per-patch pixel order (row, col, channel) as MAE."""
        p, (gh, gw), c = self.patch_size, self.patch_embed.grid_for(imgs), self.in_chans
        x = imgs.reshape(imgs.shape[0], c, gh, p, gw, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], gh * gw, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, p*p*C] -> [B, C, H, W]``; inverse of :meth:`patchify`."""
        p, (gh, gw), c = self.patch_size, self.token_grid(x.shape[1]), self.in_chans
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, gh * p, gw * p)

    # ------------------------------------------------------------------------------- masking
    def visible_slots(self, mask: torch.Tensor, visible: int | None = None,
                      width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Visible patch indices ``[B, Kmax]`` in ascending order and their padding ``[B, Kmax]``
        (True = padded slot), so images may keep different numbers of patches (AMR, shots).
        ``visible``: the count every image keeps, when the caller knows it (a fixed ratio);
        ``width``: ``Kmax``, when the caller knows it (an encoder output's slots); else ``Kmax`` is
        read from the mask, a host sync."""
        self._check_mask(mask)
        if visible is not None:
            ids = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)[:, :visible]
            return ids, torch.zeros_like(ids, dtype=torch.bool)
        counts = (~mask).sum(dim=1)
        k = width if width is not None else int(counts.max()) if mask.shape[0] else 0
        ids = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)[:, :k]
        pad = torch.arange(k, device=mask.device)[None, :] >= counts[:, None]
        return ids, pad

    def _check_mask(self, mask: torch.Tensor) -> None:
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(f"mask must be a bool tensor [B, N], got {mask.dtype} {tuple(mask.shape)}")
        self.token_grid(mask.shape[1])  # N: the patches of a grid this model runs at

    # ------------------------------------------------------------------------------- forward
    def encode(self, imgs: torch.Tensor, mask: torch.Tensor, plan=None,
               generator: torch.Generator | None = None, visible: int | None = None) -> Encoded:
        """Encoder on the visible patches of ``mask``; a shot ``plan`` (``masking.multishot``) may
        hide more patches inside the encoder, before the blocks it names. ``visible``: see
        ``visible_slots``. With ``varlen`` other than ``padded``, unequal counts (or a plan) run
        packed (``encode_packed``)."""
        n = math.prod(self.patch_embed.grid_for(imgs))
        if mask.shape[-1] != n:
            raise ValueError(f"mask must be a bool tensor [B, {n}] for images of {tuple(imgs.shape[-2:])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if self._packs(imgs, visible, plan):
            return self.encode_packed(imgs, mask, plan, generator, visible)
        ids, pad = self.visible_slots(mask, visible)
        x = self.patch_embed(imgs) + patch_positions(self, imgs)
        x = torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        shot_masks = [mask]
        kpm = None if visible is not None else _with_cls(pad)  # equal counts: nothing padded
        for j, blk in enumerate(self.blocks):
            if plan is not None and j in plan.layers:
                x, ids, pad, hidden = plan.apply(j, blk, x, ids, pad, n, generator)
                shot_masks.append(hidden)
                kpm = _with_cls(pad)
            x = blk(x, key_padding_mask=kpm)
        final = mask if len(shot_masks) == 1 else torch.stack(shot_masks).any(dim=0)
        return Encoded(self.norm(x), ids, pad, final, shot_masks)

    def encode_packed(self, imgs: torch.Tensor, mask: torch.Tensor, plan=None,
                      generator: torch.Generator | None = None, visible: int | None = None) -> Encoded:
        """:meth:`encode` with the visible tokens of all images packed, without padding, and
        attention per image (``models.packed``); the result is the same, laid out as ``encode``'s
        (padded slots of ``latent`` are zeros). One host read of the per-image counts, none when
        ``visible`` is given."""
        self._check_mask(mask)
        B, n = mask.shape
        dev_counts = (~mask).sum(dim=1)
        counts = [visible] * B if visible is not None else dev_counts.tolist()
        width = max(counts, default=0)
        ids = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)[:, :width]
        pad = torch.arange(width, device=mask.device)[None, :] >= dev_counts[:, None]
        kernel = resolve_varlen(self.varlen, imgs.device)
        seg = Segments.of([c + 1 for c in counts], dev_counts + 1, "nested" if kernel == "padded" else kernel)
        x = self.patch_embed(imgs) + patch_positions(self, imgs)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(B, -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1).flatten(0, 1)  # [B·(1+N), D]
        slots = torch.cat([ids.new_zeros(ids.shape[0], 1), 1 + ids], dim=1)  # CLS, then the visible patches
        x = x[seg.rows(slots + (1 + n) * torch.arange(B, device=ids.device)[:, None])]
        shot_masks = [mask]
        for j, blk in enumerate(self.blocks):
            if plan is not None and j in plan.layers:
                x, seg, ids, pad, hidden = plan.apply_packed(j, blk, x, seg, ids, pad, n, generator)
                shot_masks.append(hidden)
            x = blk(x, segments=seg)
        final = mask if len(shot_masks) == 1 else torch.stack(shot_masks).any(dim=0)
        return Encoded(seg.pad(self.norm(x)), ids, pad, final, shot_masks)

    def _packs(self, imgs: torch.Tensor, visible: int | None, plan) -> bool:
        """Whether ``encode`` runs packed: unequal counts (or a plan) and a packed ``varlen`` here."""
        return (visible is None or plan is not None) and resolve_varlen(self.varlen, imgs.device) != "padded"

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``imgs [B, C, H, W]``, ``mask [B, N]`` -> latent ``[B, 1+Kmax, D]`` (CLS first; with
        unequal visible counts, slots past an image's count are padding)."""
        return self.encode(imgs, mask).latent

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``latent [B, 1+K, D]`` -> ``pred [B, N, p*p*C]``; mask tokens fill the hidden slots."""
        return self.decoder_pred(self.decoder_trunk(latent, mask))

    def decoder_trunk(self, latent: torch.Tensor, mask: torch.Tensor, visible: int | None = None,
                      slots: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The decoder up to its final norm, patch tokens only, ``[B, N, Dd]``: the shared trunk that
        the pixel head (and GPA's MAM head) read. ``visible``: see ``visible_slots``; ``slots``:
        the encoder's ``(ids, pad)`` of ``mask``, which saves reading them again."""
        ids, pad = slots if slots is not None else self.visible_slots(mask, visible)
        if latent.shape[1] != ids.shape[1] + 1:
            raise ValueError(f"latent has {latent.shape[1] - 1} patch tokens but the mask shows "
                             f"{ids.shape[1]} visible patches")
        x = self.decoder_embed(latent)  # [B, 1+K, Dd]
        B, _, Dd = x.shape
        n = mask.shape[1]
        # padded slots scatter into a spare column N that is dropped: they never reach the output
        target = torch.where(pad, torch.full_like(ids, n), ids)
        full = self.mask_token.to(x.dtype).expand(B, n + 1, Dd)
        full = torch.scatter(full, 1, target.unsqueeze(-1).expand(-1, -1, Dd), x[:, 1:])[:, :n]
        pos = self.decoder_pos_embed
        pos = torch.cat([pos[:, :1], resample_positions(pos[:, 1:], self.grid_size, self.token_grid(n))], dim=1)
        x = torch.cat([x[:, :1], full], dim=1) + pos
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)[:, 1:]

    def pixel_loss(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Per-patch MSE ``[B, N]`` against (norm-pix) targets, in float32 even under autocast."""
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            target = self.patchify(imgs.float())
            if self.norm_pix_loss:
                mean = target.mean(dim=-1, keepdim=True)
                var = target.var(dim=-1, keepdim=True)  # unbiased, exactly as official MAE
                target = (target - mean) / (var + 1.0e-6) ** 0.5
            return ((pred.float() - target) ** 2).mean(dim=-1)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor):
        """MSE over hidden patches: ``(loss scalar, loss_per_image [B])``; loss = sum over hidden /
        count of hidden (0, not NaN, if none is hidden)."""
        per_patch = self.pixel_loss(imgs, pred)
        m = mask.float()
        loss = (per_patch * m).sum() / m.sum().clamp_min(1.0)
        loss_per_image = (per_patch * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        return loss, loss_per_image

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor, plan=None,
                generator: torch.Generator | None = None, visible: int | None = None) -> MAEOutput:
        """``visible``: the count every image keeps, if known on the host (no host read then)."""
        enc = self.encode(imgs, mask, plan, generator, visible)
        shots = len(enc.shot_masks) > 1  # a plan hid more: the final counts are the mask's
        packed = self._packs(imgs, visible, plan)
        features = self.decoder_trunk(enc.latent, enc.mask, None if shots else visible,
                                      (enc.ids, enc.pad) if packed else None)
        pred = self.decoder_pred(features)
        per_patch = self.pixel_loss(imgs, pred)
        m = enc.mask.float()
        loss = (per_patch * m).sum() / m.sum().clamp_min(1.0)
        loss_per_image = (per_patch * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        return MAEOutput(loss, pred, enc.mask, loss_per_image, per_patch, enc.shot_masks, enc.latent, features)

    # -------------------------------------------------------------------------------- export
    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder weights under timm ``VisionTransformer`` keys (no mask_token, no decoder_*)."""
        return {
            k: v.detach().clone().contiguous()
            for k, v in self.state_dict().items()
            if k != "mask_token" and not k.startswith("decoder_")
        }


__all__ = ["Encoded", "MAEOutput", "MaskedAutoencoderViT"]
