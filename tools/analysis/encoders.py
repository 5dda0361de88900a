"""Whatever checkpoint a user holds, as an encoder to analyse.

Accepted: a mimscale run folder (its newest complete checkpoint), a checkpoint folder or its
``state.pt``, an official MAE ``.pth`` (full or encoder-only), or a timm ``VisionTransformer`` state
dict (``.pth`` / ``.bin`` / ``.safetensors``). The architecture is read from the weights' shapes, so
the standard sizes need no flag; only the encoder is loaded (the decoder is a one-block stub).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mimscale.pretrain.engine.checkpoint import load_checkpoint, resolve_checkpoint
from mimscale.pretrain.masking.scoring import input_tokens
from mimscale.pretrain.models import (
    MODEL_SIZES,
    MaskedAutoencoderViT,
    build_mae,
    load_mae_checkpoint,
)
from mimscale.pretrain.models.export import read_file, read_state_dict

from .output import AnalysisError

_STEP = re.compile(r"^step_(\d+)$")
_STUB_DECODER = {"decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 1}


@dataclass
class Encoder:
    label: str
    model: MaskedAutoencoderViT  # eval mode; encoder weights from the checkpoint


def resolve_mimscale(path: Path) -> Path | None:
    """The complete checkpoint folder a path names (run folder -> its newest), or None if the path
    is a weights file (MAE / timm); ``resolve_checkpoint`` decides, and raises for bad paths."""
    kind, found = resolve_checkpoint(path)
    return found if kind == "mimscale" else None


def default_label(path: Path) -> str:
    """``runs/x`` -> ``x``; ``runs/x/checkpoints/step_00000100`` -> ``x@100``; ``a/b.pth`` -> ``b``."""
    folder = resolve_mimscale(path)
    if folder is None:
        return path.stem
    step = int(_STEP.match(folder.name).group(1)) if _STEP.match(folder.name) else None
    run = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
    return f"{run.name}@{step}" if step is not None else folder.name


def read_weights(path: Path) -> tuple[dict, str | None]:
    """(encoder state dict under MAE / timm keys, the model name the checkpoint records if any)."""
    kind, found = resolve_checkpoint(path)
    if kind == "mimscale":
        state = load_checkpoint(found)
        return state["model"], state.get("config", {}).get("model", {}).get("name")
    return read_state_dict(read_file(found)), None


def encoder_weights(state: dict) -> dict:
    """Only what the encoder uses: no decoder, no classifier head. timm models with global pooling
    keep their last norm as ``fc_norm``; it takes the place of ``norm``."""
    out = {k: v for k, v in state.items()
           if not (k == "mask_token" or k.startswith(("decoder_", "head.", "head_drop")))}
    if "norm.weight" not in out:
        for name in ("weight", "bias"):
            if f"fc_norm.{name}" in out:
                out[f"norm.{name}"] = out.pop(f"fc_norm.{name}")
    return {k: v for k, v in out.items() if not k.startswith("fc_norm.")}


def infer_architecture(state: dict, name: str | None = None) -> tuple[str, dict]:
    """(preset name, ``build_mae`` overrides) that fit the weights' shapes."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"):
        if key not in state:
            raise AnalysisError(f"not a ViT encoder checkpoint: key {key!r} is missing (found e.g. "
                                f"{', '.join(list(state)[:5])})")
    width = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    if grid * grid != state["pos_embed"].shape[1] - 1:
        raise AnalysisError(f"pos_embed has {state['pos_embed'].shape[1]} rows: not a square grid plus CLS")
    if name is None:
        fits = [n for n, s in MODEL_SIZES.items() if (s["embed_dim"], s["depth"]) == (width, depth)]
        if not fits:
            raise AnalysisError(f"no model preset has width {width} and {depth} blocks, so the number of "
                                f"heads is unknown; valid presets: {', '.join(MODEL_SIZES)}")
        name = fits[0]
    elif name not in MODEL_SIZES:
        raise AnalysisError(f"unknown model {name!r}; valid: {', '.join(MODEL_SIZES)}")
    preset = MODEL_SIZES[name]
    if (preset["embed_dim"], preset["depth"]) != (width, depth):
        raise AnalysisError(f"model {name} has width {preset['embed_dim']} and {preset['depth']} blocks, "
                            f"the checkpoint {width} and {depth}")
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / width
    return name, dict(img_size=grid * patch, patch_size=patch, mlp_ratio=mlp_ratio, **_STUB_DECODER)


def model_overrides(path: str | Path) -> list[str]:
    """``model.*`` overrides that fit a non-mimscale checkpoint (a mimscale one carries its config),
    so that it loads strictly into the method's student. Head counts are not in the weights: the
    decoder gets a valid one (it is never run by the analyses)."""
    path = Path(path)
    if resolve_mimscale(path) is not None:
        return []
    state = read_weights(path)[0]
    name, kwargs = infer_architecture(encoder_weights(state))
    out = [f"model.name={name}", f"model.img_size={kwargs['img_size']}", f"model.patch_size={kwargs['patch_size']}"]
    if "decoder_embed.weight" in state:
        width = state["decoder_embed.weight"].shape[0]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks."))
        out += [f"model.decoder_embed_dim={width}", f"model.decoder_depth={depth}",
                f"model.decoder_num_heads={math.gcd(width, 16)}"]
    return out


def load_encoder(path: str | Path, model: str | None = None, label: str | None = None) -> Encoder:
    """The encoder of a checkpoint of any accepted kind, in eval mode, ready to analyse."""
    path = Path(path)
    state, recorded = read_weights(path)
    state = encoder_weights(state)
    name, kwargs = infer_architecture(state, model or recorded)
    net = build_mae(name, **kwargs)
    load_mae_checkpoint(net, state)
    return Encoder(label or default_label(path), net.eval())


@torch.no_grad()
def block_inputs(model: MaskedAutoencoderViT, images: torch.Tensor) -> Iterator[torch.Tensor]:
    """Each block's input ``[B, 1+N, D]`` on the full image (the residual stream that its norm1
    reads), in order; a block runs only after its input has been used."""
    x = input_tokens(model, images)
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls.to(x.dtype), x], dim=1)
    for blk in model.blocks:
        yield x
        x = blk(x)
