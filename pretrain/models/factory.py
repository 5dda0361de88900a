"""Named MAE sizes (the official ``mae_vit_*`` names plus tiny/small) and a builder."""

from __future__ import annotations

import inspect

from .mae import MaskedAutoencoderViT

_DECODER = {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16}

MODEL_SIZES: dict[str, dict] = {
    "mae_vit_tiny_patch16": {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3},
    "mae_vit_small_patch16": {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6},
    "mae_vit_base_patch16": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12},
    "mae_vit_large_patch16": {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16},
    "mae_vit_huge_patch14": {"patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16},
}


def available_models() -> list[str]:
    return list(MODEL_SIZES)


def build_mae(name: str, **overrides) -> MaskedAutoencoderViT:
    """``build_mae('mae_vit_base_patch16', img_size=64, decoder_depth=2)``; overrides may set any
    :class:`MaskedAutoencoderViT` constructor argument."""
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_SIZES)}")
    valid = [p for p in inspect.signature(MaskedAutoencoderViT.__init__).parameters if p != "self"]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise TypeError(f"unknown argument(s) {unknown} for {name}; valid: {', '.join(valid)}")
    return MaskedAutoencoderViT(**{**_DECODER, **MODEL_SIZES[name], **overrides})
