"""The classifier is timm's ``VisionTransformer``: its API (global pool or CLS head, drop path,
``no_weight_decay``, layer groups) is the vocabulary users know, and mimscale encoders export to it
key for key."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimscale.pretrain.models import MODEL_SIZES

from .weights import PretrainedWeights

POOLS = {"cls": "token", "mean": "avg"}


class ViTClassifier(VisionTransformer):
    """timm's ViT (same state dict) whose forward can also run a perturbed pass (robustness).

    A sharded model (FSDP2, ZeRO-3) gathers its root parameters only inside its own ``forward``, so a pass
    that takes another path through the layers (occluded or shuffled patches) must enter here."""

    def forward(self, x: torch.Tensor, perturb: Callable[[VisionTransformer, torch.Tensor], torch.Tensor]
                | None = None) -> torch.Tensor:
        return super().forward(x) if perturb is None else perturb(self, x)


def build_vit(name: str, patch_size: int | None, img_size: int, num_classes: int, pool: str = "mean",
              drop_path: float = 0.0, fc_norm: bool | None = None) -> ViTClassifier:
    """A timm ViT of the ``build_mae`` size ``name``. ``pool``: ``cls`` (the CLS token after the final
    norm) or ``mean`` (patch tokens averaged; with ``fc_norm`` the norm comes after pooling, as in
    MAE fine-tuning [C], else before it). ``num_classes=0`` returns the pooled features."""
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_SIZES)}")
    if pool not in POOLS:
        raise ValueError(f"pool {pool!r} is not valid; valid: {', '.join(POOLS)}")
    size = MODEL_SIZES[name]
    return ViTClassifier(img_size=img_size, patch_size=patch_size or size["patch_size"],
                         embed_dim=size["embed_dim"], depth=size["depth"], num_heads=size["num_heads"],
                         mlp_ratio=4.0, qkv_bias=True, num_classes=num_classes, global_pool=POOLS[pool],
                         fc_norm=fc_norm, drop_path_rate=drop_path)


def load_weights(vit: VisionTransformer, weights: PretrainedWeights, with_head: bool = False) -> list[str]:
    """Load ``weights`` into ``vit``; returns the keys left at their initial values.

    The position table is resampled to the model's grid. A model that pools before its norm gets a
    fresh ``fc_norm`` and drops the pretrained final norm, as MAE fine-tuning does [C]; a model with
    a final norm takes a classifier's ``fc_norm`` when the file has no ``norm``. Without
    ``with_head`` any classifier head is dropped. Anything else that does not match raises."""
    state = dict(weights.state)
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != vit.pos_embed.shape:
        old = round((pos.shape[1] - 1) ** 0.5)
        state["pos_embed"] = resample_abs_pos_embed(pos, list(vit.patch_embed.grid_size), [old, old],
                                                    num_prefix_tokens=1)
    pooled_norm = not isinstance(vit.fc_norm, nn.Identity)
    if pooled_norm:
        _drop(state, "norm.")
    else:
        if "norm.weight" not in state and "fc_norm.weight" in state:
            state["norm.weight"], state["norm.bias"] = state.pop("fc_norm.weight"), state.pop("fc_norm.bias")
        _drop(state, "fc_norm.")
    if not with_head:
        _drop(state, "head.")
    own = vit.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{weights.label} ({weights.kind}) has other shapes than the model (checkpoint vs "
                         f"model): {wrong[:3]}; is model.name the checkpoint's size? (auto reads it)")
    result = vit.load_state_dict(state, strict=False)
    fresh_ok = ("head.", "fc_norm.") if not with_head else ("fc_norm.",) if pooled_norm else ()
    bad = [k for k in result.missing_keys if not k.startswith(fresh_ok)]
    if bad or result.unexpected_keys:
        raise ValueError(f"{weights.label} ({weights.kind}) does not fit the model: missing {bad[:6]}, "
                         f"unexpected {list(result.unexpected_keys)[:6]}")
    return list(result.missing_keys)


def _drop(state: dict, prefix: str) -> None:
    for k in [k for k in state if k.startswith(prefix)]:
        del state[k]


def init_head(head: nn.Linear, std: float) -> None:
    trunc_normal_(head.weight, std=std)
    nn.init.zeros_(head.bias)


class LinearProbe(nn.Module):
    """A frozen encoder (always in eval mode, no gradient) under ``BatchNorm1d(affine=False)`` + a
    linear layer, MAE's linear-probe head [C]. With ``encoder=None`` it takes features directly
    (cached features)."""

    def __init__(self, encoder: nn.Module | None, dim: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        if encoder is not None:
            encoder.requires_grad_(False)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        init_head(self.head[1], std=0.01)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder is not None:
            with torch.no_grad():
                x = self.encoder(x)
        return self.head(x.float())
