"""Pretrained weights from whatever a user holds, as a timm ``VisionTransformer`` state dict.

Detected, in this order: a mimscale run / checkpoint folder / ``state.pt`` (pretraining or a
classifier written by ``mimscale finetune``); an official MAE file (``{'model': ...}``: pretraining
with or without decoder, or fine-tuned with ``fc_norm`` and ``head``); anything else (a bare state
dict, ``.safetensors``) is a timm state dict. The three share the encoder's key names, so only
decoder keys are dropped; the architecture is what the checkpoint records, else read from shapes.
The pretraining mask ratio is kept when the file records it (a mimscale config's ``masking.ratio``,
an MAE file's ``args.mask_ratio``), so results can be analysed against it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mimscale.pretrain.engine.checkpoint import load_checkpoint, resolve_checkpoint
from mimscale.pretrain.models.export import read_file, read_state_dict
from mimscale.tools.analysis.encoders import default_label, encoder_weights, infer_architecture


@dataclass
class PretrainedWeights:
    state: dict[str, torch.Tensor]   # timm keys; ``fc_norm`` / ``head`` only for classifiers
    kind: str                        # mimscale | mae | timm | classifier
    label: str                       # how results name the checkpoint
    model: str | None = None         # a ``build_mae`` preset, when the file records it
    patch_size: int | None = None
    recipe: str | None = None        # the pretraining recipe, when recorded
    meta: dict = field(default_factory=dict)  # classifiers: classes, pool, img_size, ...
    mask_ratio: float | None = None  # the pretraining masking ratio, when recorded

    @property
    def has_head(self) -> bool:
        return "head.weight" in self.state

    def architecture(self, name: str = "auto") -> tuple[str, int]:
        """(preset name, patch size): the recorded one, else inferred from the weights' shapes."""
        if name == "auto" and self.model:
            return self.model, self.patch_size or _patch(self.state)
        inferred, kwargs = infer_architecture(encoder_weights(self.state), None if name == "auto" else name)
        return inferred, kwargs["patch_size"]

    def pretrain_img_size(self) -> int:
        """The resolution the position table was learnt at."""
        pos = self.state["pos_embed"]
        return round((pos.shape[1] - 1) ** 0.5) * _patch(self.state)


def _patch(state: dict) -> int:
    return int(state["patch_embed.proj.weight"].shape[-1])


def _strip_decoder(state: dict) -> dict:
    return {k: v for k, v in state.items() if not (k == "mask_token" or k.startswith("decoder_"))}


def read_weights(path: str | os.PathLike) -> PretrainedWeights:
    """Read and classify a checkpoint of any kind ``resolve_checkpoint`` accepts; a bad path or
    file raises ``CheckpointError``."""
    path = Path(path)
    kind, found = resolve_checkpoint(path)
    if kind == "mimscale":
        ckpt = load_checkpoint(found)
        config = ckpt.get("config") or {}
        if "classifier" in ckpt:  # written by mimscale finetune / linprobe
            meta = ckpt["classifier"]
            return PretrainedWeights(ckpt["model"], "classifier", meta.get("label") or default_label(path),
                                     meta.get("model"), meta.get("patch_size"), meta.get("recipe"), meta,
                                     _ratio(meta.get("mask_ratio")))
        model = config.get("model") or {}
        return PretrainedWeights(_strip_decoder(ckpt["model"]), "mimscale", default_label(path),
                                 model.get("name"), model.get("patch_size"), config.get("recipe"),
                                 mask_ratio=_ratio((config.get("masking") or {}).get("ratio")))
    raw = read_file(found)
    kind = "mae" if isinstance(raw.get("model"), dict) else "timm"
    args = raw.get("args")  # MAE pickles its argparse namespace
    ratio = args.get("mask_ratio") if isinstance(args, dict) else getattr(args, "mask_ratio", None)
    return PretrainedWeights(_strip_decoder(read_state_dict(raw)), kind, path.stem,
                             mask_ratio=_ratio(ratio) if kind == "mae" else None)


def _ratio(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@functools.lru_cache(maxsize=2)
def _cached(path: str, mtime: float) -> PretrainedWeights:
    return read_weights(path)


def cached_weights(path: str | os.PathLike) -> PretrainedWeights:
    """``read_weights`` once per file version (the config reads the architecture, the run the
    weights)."""
    found = resolve_checkpoint(path).path  # a run folder: keyed on its newest checkpoint
    return _cached(str(found.resolve()), found.stat().st_mtime)
