"""Moving weights in and out: timm export and official-MAE checkpoint loading."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .mae import MaskedAutoencoderViT


def _unwrap(model: nn.Module) -> MaskedAutoencoderViT:
    """Strip DDP / compile wrappers (``.module`` / ``._orig_mod``)."""
    while not isinstance(model, MaskedAutoencoderViT):
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a MaskedAutoencoderViT, got {type(model).__name__}")
        model = inner
    return model


def to_timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Encoder weights keyed for timm ``VisionTransformer`` (cls_token, pos_embed, patch_embed,
    blocks, norm), cloned; ``timm.create_model(name, num_classes=0)`` loads them strictly."""
    return _unwrap(model).encoder_state_dict()


def _is_decoder_key(key: str) -> bool:
    return key == "mask_token" or key.startswith("decoder_")


@dataclass
class LoadResult:
    """What :func:`load_mae_checkpoint` did: ``missing_keys`` are model keys the checkpoint lacked
    (only ever decoder keys, for encoder-only files)."""

    encoder_only: bool
    missing_keys: list[str] = field(default_factory=list)


def _read(path: str | os.PathLike) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MAE checkpoint not found: {os.fspath(path)!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Official MAE checkpoints pickle an argparse.Namespace under 'args', which the safe
        # loader refuses. Fall back to full unpickling: only do this for files you trust.
        return torch.load(path, map_location="cpu", weights_only=False)


def read_state_dict(path_or_state: str | os.PathLike | dict) -> dict:
    """The bare state dict of an MAE-style checkpoint: unwraps ``model`` / ``state_dict`` and a
    ``module.`` prefix."""
    state = path_or_state if isinstance(path_or_state, dict) else _read(path_or_state)
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_mae_checkpoint(model: nn.Module, path_or_state: str | os.PathLike | dict) -> LoadResult:
    """Load an MAE checkpoint (path or dict) into ``model``.

    Accepts ``{'model': sd}`` / ``{'state_dict': sd}`` / a bare state dict, with or without a
    ``module.`` prefix. With decoder keys present the load is strict; an encoder-only file (the
    official ``mae_pretrain_vit_*.pth``) loads the encoder strictly and reports the decoder keys
    it left at their initial values.
    """
    state = read_state_dict(path_or_state)

    target = _unwrap(model)
    if any(_is_decoder_key(k) for k in state):
        target.load_state_dict(state, strict=True)
        return LoadResult(encoder_only=False)
    result = target.load_state_dict(state, strict=False)
    bad_missing = [k for k in result.missing_keys if not _is_decoder_key(k)]
    if bad_missing or result.unexpected_keys:
        raise RuntimeError(
            "encoder-only MAE checkpoint does not match the encoder: "
            f"missing {bad_missing}, unexpected {list(result.unexpected_keys)}"
        )
    return LoadResult(encoder_only=True, missing_keys=list(result.missing_keys))
