"""Pretrained encoder weights into a dense backbone, from any file a user is likely to have.

Accepted: a mimscale checkpoint folder (or its ``state.pt``), an official MAE ``.pth`` (with or
without decoder), a timm ViT state dict, and the files ``mimscale convert --to mmdet|mmseg``
writes. The backbone's keys must all be present; everything else (decoder, CLS token, final norm,
heads) is reported as ignored, and the position table is resized to the backbone's grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mimscale.pretrain.models.export import read_checkpoint, read_state_dict
from mimscale.pretrain.models.factory import MODEL_SIZES

from .backbone import ViTBackbone, resize_pos_embed

_PREFIXES = ("module.", "backbone.", "encoder.")


@dataclass
class EncoderWeights:
    """A flat encoder state dict, and the architecture when the file records it
    (``name``, ``patch_size``; mimscale checkpoints and converted files do)."""

    state: dict[str, torch.Tensor]
    arch: dict | None = None


def read_encoder_weights(source: str | os.PathLike | dict | EncoderWeights) -> EncoderWeights:
    """The encoder weights of a loaded dict or of any checkpoint path ``resolve_checkpoint``
    accepts (a converted mmdet / mmseg file included)."""
    if isinstance(source, EncoderWeights):
        return source
    if not isinstance(source, dict):
        source = read_checkpoint(source)
    model = (source.get("config") or {}).get("model") or {}  # a mimscale checkpoint records its model
    arch = ({"name": model["name"], "patch_size": model.get("patch_size")} if "name" in model
            else (source.get("meta") or {}).get("arch"))  # a converted file records it under meta
    return EncoderWeights(_strip(read_state_dict(source)), arch)


def _strip(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for p in _PREFIXES:
            k = k.removeprefix(p)
        out[k] = v
    return out


def load_backbone_weights(backbone: ViTBackbone, source) -> list[str]:
    """Copy the encoder weights of ``source`` into ``backbone``; returns the ignored keys.

    Raises if a backbone key is missing or has another shape (other than the position table,
    which is resized)."""
    weights = read_encoder_weights(source)
    own = backbone.state_dict()
    state = dict(weights.state)
    if "pos_embed" in state:
        grid = round((own["pos_embed"].shape[1] - 1) ** 0.5)
        pos = state["pos_embed"]
        if pos.shape[1] == grid * grid:  # a table without the CLS row
            pos = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
        state["pos_embed"] = resize_pos_embed(pos, (grid, grid))
    missing = [k for k in own if k not in state]
    if missing:
        raise KeyError(f"checkpoint lacks backbone weights {missing[:6]}{' ...' if len(missing) > 6 else ''}; "
                       "is it a ViT encoder of the same size?")
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"checkpoint weights do not fit the backbone (checkpoint vs backbone): {wrong[:4]}")
    backbone.load_state_dict({k: state[k] for k in own}, strict=True)
    return sorted(k for k in state if k not in own)


def build_backbone(name: str = "auto", checkpoint: str | os.PathLike | None = None,
                   patch_size: int | None = None, **kwargs) -> ViTBackbone:
    """A :class:`ViTBackbone` of model ``name`` (``auto``: the one the checkpoint records), with the
    checkpoint's encoder weights when one is given; ``kwargs`` go to the backbone."""
    weights = read_encoder_weights(checkpoint) if checkpoint else None
    if name == "auto":
        if weights is None or not weights.arch:
            raise ValueError("backbone.name=auto needs a mimscale checkpoint (or a converted file) that "
                             f"records its model; set backbone.name to one of: {', '.join(MODEL_SIZES)}")
        name, patch_size = weights.arch["name"], patch_size or weights.arch.get("patch_size")
    if kwargs.get("pretrain_img_size") is None:  # keep the checkpoint's grid: no double resize
        kwargs["pretrain_img_size"] = _pretrain_size(weights, name, patch_size)
    backbone = ViTBackbone.from_name(name, patch_size=patch_size, **kwargs)
    if weights is not None:
        load_backbone_weights(backbone, weights)
    return backbone


def _pretrain_size(weights: EncoderWeights | None, name: str, patch_size: int | None) -> int:
    patch = patch_size or MODEL_SIZES[name]["patch_size"]
    pos = weights.state.get("pos_embed") if weights is not None else None
    if pos is None:
        return 224 // patch * patch
    return round((pos.shape[1] - 1) ** 0.5) * patch
