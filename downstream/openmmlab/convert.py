"""``mimscale convert --to mmdet|mmseg``: a pretrained encoder as the file the shipped configs load.

The file holds ``state_dict`` (the :class:`~mimscale.downstream.dense.ViTBackbone` keys:
``patch_embed``, ``pos_embed`` resized to the target's input grid, ``blocks``) and ``meta`` (the
architecture, so ``MimViT`` and ``backbone.name=auto`` can check it). Plain torch: mmengine's
checkpoint loader and ``mimscale detect|segment backbone.checkpoint=`` both read it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mimscale.downstream.dense.backbone import ViTBackbone
from mimscale.downstream.dense.weights import load_backbone_weights, read_encoder_weights

# input size of each protocol: ViTDet's 1024 LSJ crops, the ADE20K 512 crops
TARGET_IMG_SIZE = {"mmdet": 1024, "mmseg": 512}


def convert_to_openmmlab(checkpoint, target: str, out: str | os.PathLike, img_size: int | None = None,
                         arch: str | None = None) -> Path:
    """Write the encoder of ``checkpoint`` (mimscale checkpoint folder or its loaded dict, MAE or
    timm ``.pth``) for ``target`` (mmdet | mmseg) to ``out``; ``arch`` names the model size where
    the file does not record it (MAE / timm files)."""
    if target not in TARGET_IMG_SIZE:
        raise ValueError(f"target {target!r} is not valid; valid: {', '.join(TARGET_IMG_SIZE)}")
    weights = read_encoder_weights(checkpoint)
    recorded = weights.arch or {}
    name = arch or recorded.get("name")
    if not name:
        raise ValueError("the checkpoint does not record its model size; pass arch (e.g. mae_vit_base_patch16)")
    img_size = img_size or TARGET_IMG_SIZE[target]
    backbone = ViTBackbone.from_name(name, patch_size=recorded.get("patch_size"), pretrain_img_size=img_size,
                                     drop_path=0.0, window_size=0)
    ignored = load_backbone_weights(backbone, weights)
    meta = {"arch": {"name": name, "patch_size": backbone.patch_size}, "target": target,
            "img_size": img_size, "embed_dim": backbone.embed_dim, "depth": backbone.depth,
            "ignored_keys": ignored, "source": str(checkpoint) if not isinstance(checkpoint, dict) else None}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    torch.save({"state_dict": backbone.state_dict(), "meta": meta}, tmp)
    tmp.replace(out)  # atomic: a reader sees the old file or the new one
    return out
