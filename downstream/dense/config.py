"""Config sections shared by ``mimscale detect`` and ``mimscale segment``.

Built with the project's config machinery (typed dataclasses, YAML file, ``key=value`` overrides,
strict: an unknown key or a bad value is an error naming what is valid). Each task defines its
own tree from these sections and its own defaults (the papers' settings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mimscale.config import ConfigError, _apply, _opt, _yaml, parse_overrides
from mimscale.pretrain.engine.checkpoint import check_checkpoint_option


@dataclass
class BackboneConfig:
    name: str = _opt("auto", "ViT size (a `build_mae` name, e.g. mae_vit_base_patch16); auto = the one "
                     "the checkpoint records")
    checkpoint: str | None = _opt(None, "pretrained encoder: mimscale checkpoint folder, MAE/timm .pth "
                                  "or a `mimscale convert` file; null = random init")
    patch_size: int | None = _opt(None, "patch size; null = the model's", gt=0)
    pretrain_img_size: int | None = _opt(None, "grid of the learnt position table, in pixels; null = the "
                                         "checkpoint's (224 without one)", gt=0)
    drop_path: float = _opt(0.1, "stochastic depth rate, linear over the blocks", ge=0, lt=1)
    window_size: int = _opt(14, "window attention side in patches; 0 = global attention everywhere", ge=0)
    global_blocks: list[int] | None = _opt(None, "blocks with global attention; null = the last of each "
                                           "quarter of the depth (ViTDet)")
    activation_checkpointing: bool = _opt(False, "recompute each block in backward (less memory)")


@dataclass
class OptimConfig:
    lr: float = _opt(1e-4, "peak AdamW learning rate (for the whole batch)", gt=0)
    weight_decay: float = _opt(0.1, "AdamW weight decay (not on norms, biases, position tables)", ge=0)
    layer_decay: float = _opt(0.7, "layer-wise lr decay: block k trains at lr·decay^(L−k)", gt=0, le=1)
    betas: tuple[float, float] = _opt((0.9, 0.999), "AdamW betas")
    clip_grad: float | None = _opt(None, "max gradient norm; null disables clipping", gt=0)


@dataclass
class EngineConfig:
    backend: str = _opt("ddp", "data parallel (also single process)", choices=("ddp",))
    device: str = _opt("auto", "compute device", choices=("auto", "cpu", "cuda"))
    precision: str = _opt("bf16", "autocast dtype; weights and losses stay fp32", choices=("bf16", "fp32"))
    seed: int = _opt(0, "seed of initialisation, data order and augmentation", ge=0)
    threads: int | None = _opt(None, "torch intra-op threads per process", ge=1)
    num_workers: int = _opt(4, "data loader workers per process", ge=0)


@dataclass
class OutputConfig:
    dir: str = _opt("runs/dense", "run folder: config, metrics.jsonl, checkpoints, eval.json")
    log_every: int = _opt(20, "iterations between metric lines", ge=1)
    checkpoint_every: int = _opt(5000, "iterations between checkpoints (and one at the end)", ge=1)
    keep_last: int | None = _opt(2, "complete checkpoints kept; null keeps all", ge=1)
    progress: str = _opt("auto", "progress bar; auto = on a terminal", choices=("auto", "on", "off"))


T = TypeVar("T")


def load_task_config(cls: type[T], overrides: list[str] | None = None, file: str | None = None,
                     validate: bool = True) -> T:
    """Defaults of ``cls`` <- YAML ``file`` <- ``key=value`` overrides, then ``cfg.validate()``."""
    cfg = cls()
    if file:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"--config: file {path} does not exist")
        data = _yaml(path.read_text()) or {}
        _apply(cfg, data)
    _apply(cfg, parse_overrides(list(overrides or [])))
    if validate:
        cfg.validate()
    return cfg


def validate_backbone(b: BackboneConfig) -> None:
    if b.name == "auto" and not b.checkpoint:
        raise ConfigError("backbone.name=auto reads the model from backbone.checkpoint; give a checkpoint "
                          "or a model name (e.g. backbone.name=mae_vit_base_patch16)")
    if b.checkpoint:
        check_checkpoint_option("backbone.checkpoint", b.checkpoint)
