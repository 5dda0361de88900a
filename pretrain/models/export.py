"""Moving weights in and out: timm export and official-MAE checkpoint loading."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from mimscale.errors import CheckpointError
from mimscale.pretrain.engine.checkpoint import load_checkpoint, resolve_checkpoint
from mimscale.pretrain.engine.safe_load import load_file

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


def read_file(path: str | os.PathLike) -> dict:
    """The dict a weights file holds (an official MAE or timm ``.pth``/``.bin``/``.safetensors``),
    read without unpickling code."""
    raw = load_file(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{os.fspath(path)} holds a {type(raw).__name__}, not a state dict; give "
                              "a file that torch.save wrote a dict of tensors to (an MAE or timm checkpoint)")
    return raw


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Any checkpoint path, as a dict: a mimscale run / checkpoint folder (consolidated) or a file."""
    kind, found = resolve_checkpoint(path)
    return load_checkpoint(found) if kind == "mimscale" else read_file(found)


def read_state_dict(path_or_state: str | os.PathLike | dict) -> dict:
    """The bare state dict of an MAE-style checkpoint (a path of any kind ``resolve_checkpoint``
    accepts, or a loaded dict): unwraps ``model`` / ``state_dict`` and a ``module.`` prefix."""
    state = path_or_state if isinstance(path_or_state, dict) else read_checkpoint(path_or_state)
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
    encoder_only = not any(_is_decoder_key(k) for k in state)
    _check_fit(target.state_dict(), state, encoder_only)
    result = target.load_state_dict(state, strict=not encoder_only)
    if not encoder_only:
        return LoadResult(encoder_only=False)
    return LoadResult(encoder_only=True, missing_keys=list(result.missing_keys))


def _check_fit(own: dict, state: dict, encoder_only: bool) -> None:
    """Raise one readable CheckpointError when ``state`` cannot load into a model whose state dict
    is ``own`` (torch's own message lists every tensor, hundreds of lines for a ViT)."""
    missing = [k for k in own if k not in state and not (encoder_only and _is_decoder_key(k))]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or wrong):
        return
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape (checkpoint vs "
                                                                           "model)", wrong)):
        if keys:
            parts.append(f"{len(keys)} {what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}")
    width = state.get("cls_token")
    hint = (f" (the checkpoint's ViT is {width.shape[-1]} wide, the model {own['cls_token'].shape[-1]})"
            if width is not None and "cls_token" in own and width.shape[-1] != own["cls_token"].shape[-1] else "")
    raise CheckpointError(f"the checkpoint's weights do not fit the model: {'; '.join(parts)}{hint}")
