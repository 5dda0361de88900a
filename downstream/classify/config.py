"""Typed configs of ``mimscale finetune``, ``linprobe`` and ``knn``: the project's config machinery
(defaults <- recipe <- YAML file <- ``key=value``; an unknown key or bad value names what is valid).

Fine-tuning defaults are MAE's FINETUNE.md recipe for ViT-B; ``recipe=auto`` picks the ViT-L / ViT-H
values from the encoder's size. Linear-probe defaults are MAE's LINPROBE.md, k-NN's are DINO's.
Tags: [C] the official code / its README, [P] the paper, [S] this project's choice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from mimscale.config import (
    ConfigError,
    _apply,
    _merge,
    _opt,
    _yaml,
    check_sharding_options,
    parse_overrides,
    to_dict,
)
from mimscale.pretrain.engine.checkpoint import check_checkpoint_option

from .datasets import DATASETS


@dataclass
class FeatureModelConfig:
    name: str = _opt("auto", "encoder size, a `build_mae` preset (e.g. mae_vit_base_patch16); auto = "
                     "the one the checkpoint records, else inferred from its shapes")
    patch_size: int | None = _opt(None, "patch size; null = the checkpoint's (the preset's without one)", gt=0)
    img_size: int | None = _opt(None, "input resolution; null = the checkpoint's pretraining resolution "
                                "(224 without a checkpoint); the position table is resampled to it", gt=0)
    pool: str = _opt("cls", "features: the CLS token [C: MAE linprobe --cls_token, DINO] or the mean of "
                     "the patch tokens", choices=("cls", "mean"))


@dataclass
class FinetuneModelConfig(FeatureModelConfig):
    pool: str = _opt("mean", "head input: mean of the patch tokens then a fresh norm [C: MAE global_pool], "
                     "or the CLS token after the final norm", choices=("cls", "mean"))
    drop_path: float = _opt(0.1, "stochastic depth rate [C: ViT-B 0.1, ViT-L 0.2, ViT-H 0.3]", ge=0, lt=1)
    head_init_std: float = _opt(2e-5, "std of the head's truncated-normal init [C]", gt=0)


@dataclass
class DataConfig:
    dataset: str = _opt("imagenet", "data set, read from its official layout under data.root",
                        choices=tuple(DATASETS))
    root: str | None = _opt(None, "the data set's folder (not needed for synthetic)")
    train_split: str = _opt("auto", "training split; auto = the official one (flowers102, dtd: trainval)")
    eval_split: str = _opt("auto", "split results are reported on; auto = the official test/val split")
    fold: int = _opt(1, "dtd: which of the 10 official splits", ge=1, le=10)
    batch_size: int = _opt(32, "images per rank per micro-step [C: 32 x 32 GPUs = 1024]", gt=0)
    num_workers: int = _opt(8, "data loader workers per rank", ge=0)
    crop_pct: float = _opt(0.875, "evaluation: resize to img_size / crop_pct, center crop [C: 224/256]", gt=0, le=1)
    subset: float | None = _opt(None, "semi-supervised: train on this fraction of each class (0.01, "
                                "0.1), drawn with subset_seed and saved to <output.dir>/subset.txt", gt=0, le=1)
    subset_file: str | None = _opt(None, "semi-supervised: train only on the samples this file lists "
                                   "(one path or base name per line, e.g. SimCLR's 1percent.txt)")
    subset_seed: int = _opt(0, "seed of the per-class subset draw", ge=0)
    synthetic_images: int = _opt(600, "synthetic: training images generated", gt=0)
    synthetic_val_images: int = _opt(300, "synthetic: validation images generated", gt=0)
    synthetic_size: int = _opt(32, "synthetic: side of the generated images", gt=0)
    synthetic_objects: int = _opt(1, "synthetic: most objects per image (label = the largest's shape)", ge=1)


@dataclass
class AugmentConfig:
    auto_augment: str | None = _opt("rand-m9-mstd0.5-inc1", "timm RandAugment policy; null = none [C]")
    color_jitter: float | None = _opt(None, "colour jitter strength (unused with auto_augment) [C]", ge=0)
    crop_scale: tuple[float, float] = _opt((0.08, 1.0), "RandomResizedCrop area range [C: timm default]")
    hflip: float = _opt(0.5, "horizontal flip probability", ge=0, le=1)
    reprob: float = _opt(0.25, "random erasing probability [C]", ge=0, le=1)
    remode: str = _opt("pixel", "random erasing fill [C]", choices=("const", "rand", "pixel"))
    recount: int = _opt(1, "random erasing count [C]", ge=1)
    mixup: float = _opt(0.8, "mixup alpha; 0 = off [C]", ge=0)
    cutmix: float = _opt(1.0, "cutmix alpha; 0 = off [C]", ge=0)
    cutmix_minmax: tuple[float, float] | None = _opt(None, "cutmix box ratio range; overrides alpha [C]")
    mixup_prob: float = _opt(1.0, "probability of mixing a batch [C]", ge=0, le=1)
    mixup_switch_prob: float = _opt(0.5, "probability of cutmix rather than mixup [C]", ge=0, le=1)
    mixup_mode: str = _opt("batch", "one mix per batch, pair or element [C]", choices=("batch", "pair", "elem"))
    smoothing: float = _opt(0.1, "label smoothing [C]", ge=0, lt=1)


@dataclass
class FinetuneOptimConfig:
    blr: float = _opt(5e-4, "base lr; lr = blr x effective batch / 256 [C: ViT-B 5e-4, ViT-L/H 1e-3]", gt=0)
    lr: float | None = _opt(None, "absolute lr; overrides blr when set", gt=0)
    min_lr: float = _opt(1e-6, "floor of the cosine schedule [C]", ge=0)
    weight_decay: float = _opt(0.05, "AdamW weight decay (not on 1-D params, position table, CLS) [C]", ge=0)
    layer_decay: float = _opt(0.65, "layer-wise lr decay [C: ViT-B 0.65, ViT-L/H 0.75]", gt=0, le=1)
    betas: tuple[float, float] = _opt((0.9, 0.999), "AdamW betas [C: torch defaults]")
    clip_grad: float | None = _opt(None, "max gradient norm; null = no clipping [C]", gt=0)
    accum_steps: int = _opt(1, "micro-steps per optimizer step", ge=1)


@dataclass
class LinprobeOptimConfig:
    blr: float = _opt(0.1, "base lr; lr = blr x effective batch / 256 [C]", gt=0)
    lr: float | None = _opt(None, "absolute lr; overrides blr when set", gt=0)
    min_lr: float = _opt(0.0, "floor of the cosine schedule [C]", ge=0)
    weight_decay: float = _opt(0.0, "LARS weight decay [C]", ge=0)
    momentum: float = _opt(0.9, "LARS momentum [C]", ge=0, lt=1)
    trust_coefficient: float = _opt(0.001, "LARS trust coefficient [C]", gt=0)
    clip_grad: float | None = _opt(None, "max gradient norm; null = no clipping", gt=0)
    accum_steps: int = _opt(1, "micro-steps per optimizer step", ge=1)


@dataclass
class ScheduleConfig:
    epochs: int = _opt(100, "training epochs [C: ViT-B 100, ViT-L/H 50]", ge=1)
    warmup_epochs: float = _opt(5.0, "linear warmup in epochs [C]", ge=0)
    max_steps: int | None = _opt(None, "optimizer steps; overrides epochs (quick runs)", ge=1)


@dataclass
class EMAConfig:
    enabled: bool = _opt(False, "keep an EMA of the weights and evaluate it too [S: MAE has none]")
    decay: float = _opt(0.9999, "EMA decay per optimizer step", gt=0, lt=1)


@dataclass
class EvalConfig:
    every: int = _opt(1, "epochs between evaluations (and one at the end)", ge=1)
    robustness: bool = _opt(True, "at the end, also evaluate with patches occluded and shuffled "
                            "(seed 004 A.5)")
    occlusion: float = _opt(0.5, "fraction of patches dropped for the occlusion result [P]", gt=0, lt=1)


@dataclass
class KNNConfig:
    k: int = _opt(20, "neighbours that vote [C: DINO]", ge=1)
    temperature: float = _opt(0.07, "vote weight exp(sim / T) [C: DINO]", gt=0)
    chunk: int = _opt(1024, "queries compared with the bank at once", ge=1)


@dataclass
class EngineConfig:
    backend: str = _opt("ddp", "ddp: data parallel (also single process) under torchrun/srun; fsdp "
                        "(finetune, linprobe): FSDP2, parameters, gradients and optimizer state sharded "
                        "per transformer block, sharded resumable checkpoints; deepspeed (finetune, "
                        "linprobe): ZeRO of engine.zero_stage, resumable on the same number of ranks",
                        choices=("ddp", "fsdp", "deepspeed"))
    zero_stage: int = _opt(2, "deepspeed: ZeRO stage; 1 shards optimizer state, 2 + gradients, 3 + "
                           "parameters", choices=(1, 2, 3))
    deepspeed_config: str | None = _opt(None, "deepspeed: JSON file merged over the generated DeepSpeed config")
    cpu_offload: bool = _opt(False, "on GPUs: keep fsdp's sharded state, or deepspeed's optimizer state, "
                             "in host memory")
    device: str = _opt("auto", "compute device", choices=("auto", "cpu", "cuda"))
    precision: str = _opt("bf16", "autocast dtype; weights, losses and features stay fp32",
                          choices=("bf16", "fp32"))
    seed: int = _opt(0, "seed of head init, data order, augmentation and perturbations", ge=0)
    threads: int | None = _opt(None, "torch intra-op threads per process", ge=1)
    max_nonfinite_steps: int = _opt(10, "consecutive non-finite steps skipped before stopping", ge=0)


@dataclass
class OutputConfig:
    dir: str = _opt("runs/classify", "run folder: config, metrics.jsonl, checkpoints, result JSONs")
    log_every: int = _opt(20, "optimizer steps between metric lines", ge=1)
    checkpoint_every: int = _opt(1, "epochs between checkpoints (and one at the end)", ge=1)
    keep_last: int | None = _opt(1, "complete checkpoints kept; null keeps all", ge=1)
    tensorboard: bool = _opt(True, "write TensorBoard scalars")
    progress: str = _opt("auto", "progress bar; auto = on a terminal", choices=("auto", "on", "off"))


def _feature_checks(cfg) -> None:
    d, e = cfg.data, cfg.engine
    if cfg.protocol == "knn" and e.backend != "ddp":
        raise ConfigError(f"engine.backend: {e.backend!r} is not offered by mimscale knn; valid: ddp (k-NN "
                          "trains nothing, so there is no state to shard; checkpoints pretrained with any "
                          "backend load as-is)")
    check_sharding_options(e)
    if cfg.checkpoint:
        check_checkpoint_option("checkpoint", cfg.checkpoint)
    if cfg.model.name == "auto" and not cfg.checkpoint:
        raise ConfigError("model.name=auto reads the encoder size from the checkpoint; give checkpoint=... "
                          "or a model name (e.g. model.name=mae_vit_base_patch16)")
    if d.dataset != "synthetic" and not d.root:
        raise ConfigError(f"data.root: required for data.dataset={d.dataset} (its official layout; "
                          "data.dataset=synthetic needs none)")
    if d.fold != 1 and d.dataset != "dtd":
        raise ConfigError(f"data.fold: only dtd has numbered splits (data.dataset={d.dataset})")
    valid = DATASETS[d.dataset].splits
    for key in ("train_split", "eval_split"):
        split = getattr(d, key)
        if split != "auto" and split not in valid:
            raise ConfigError(f"data.{key}: {split!r} is not a split of {d.dataset}; valid: auto, "
                              f"{', '.join(valid)}")


@dataclass
class FinetuneConfig:
    recipe: str = _opt("auto", "defaults of MAE fine-tuning per size; auto = from the encoder's depth",
                       choices=("auto", "mae_vit_base", "mae_vit_large", "mae_vit_huge"))
    checkpoint: str | None = _opt(None, "pretrained encoder: mimscale run/checkpoint, MAE .pth, timm state "
                                  "dict; with eval_only a fine-tuned classifier; null = random init")
    resume: str = _opt("none", "'none', 'auto' (newest checkpoint in output.dir) or a checkpoint folder")
    eval_only: bool = _opt(False, "only evaluate the fine-tuned classifier given as checkpoint=...")
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/finetune"))

    protocol = "finetune"

    def validate(self) -> None:
        _feature_checks(self)
        a, d = self.augment, self.data
        mixing = a.mixup > 0 or a.cutmix > 0 or a.cutmix_minmax is not None
        if mixing and d.batch_size % 2:
            raise ConfigError(f"data.batch_size: mixup/cutmix pair samples, so it must be even (got "
                              f"{d.batch_size}); or set augment.mixup=0 augment.cutmix=0")
        if d.subset is not None and d.subset_file:
            raise ConfigError("data.subset and data.subset_file: give one (a fraction to draw, or a file)")
        if self.eval_only and not self.checkpoint:
            raise ConfigError("eval_only: needs checkpoint=<a fine-tuned classifier> (a mimscale finetune "
                              "run or checkpoint, or an MAE fine-tuned .pth)")
        if self.ema.enabled and self.engine.backend != "ddp":
            raise ConfigError(f"ema.enabled: the EMA of the weights is kept with engine.backend=ddp only "
                              f"(not {self.engine.backend}); drop ema.enabled or use ddp")
        lo, hi = a.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"augment.crop_scale: {list(a.crop_scale)} must satisfy 0 < min <= max <= 1")


@dataclass
class LinprobeConfig:
    recipe: str = _opt("mae_linprobe", "defaults of MAE's linear probe (every size)", choices=("mae_linprobe",))
    checkpoint: str | None = _opt(None, "pretrained encoder (see finetune); null = random init")
    resume: str = _opt("none", "'none', 'auto' or a checkpoint folder")
    model: FeatureModelConfig = field(default_factory=FeatureModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=512))
    cache_features: bool = _opt(False, "compute the encoder's features once (evaluation transform, no "
                                "augmentation) and train the head on them: much faster, not MAE's protocol [S]")
    crop_scale: tuple[float, float] = _opt((0.08, 1.0), "training RandomResizedCrop area range [C]")
    hflip: bool = _opt(True, "random horizontal flip in training [C]")
    optim: LinprobeOptimConfig = field(default_factory=LinprobeOptimConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(epochs=90, warmup_epochs=10.0))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(robustness=False))
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/linprobe"))

    protocol = "linprobe"

    def validate(self) -> None:
        _feature_checks(self)
        if self.eval.robustness:
            raise ConfigError("eval.robustness: evaluated on fine-tuned models only (mimscale finetune)")
        if self.data.subset is not None and self.data.subset_file:
            raise ConfigError("data.subset and data.subset_file: give one (a fraction to draw, or a file)")


@dataclass
class KNNRunConfig:
    checkpoint: str | None = _opt(None, "pretrained encoder (see finetune); null = random init")
    model: FeatureModelConfig = field(default_factory=FeatureModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=128))
    knn: KNNConfig = field(default_factory=KNNConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/knn"))

    protocol = "knn"
    recipe = "dino_knn"

    def validate(self) -> None:
        _feature_checks(self)


# MAE FINETUNE.md per size [C]; the dataclass defaults are ViT-B's.
FINETUNE_RECIPES: dict[str, dict] = {
    "mae_vit_base": {},
    "mae_vit_large": {"schedule": {"epochs": 50}, "optim": {"blr": 1e-3, "layer_decay": 0.75},
                      "model": {"drop_path": 0.2}},
    "mae_vit_huge": {"schedule": {"epochs": 50}, "optim": {"blr": 1e-3, "layer_decay": 0.75},
                     "model": {"drop_path": 0.3}},
}


def _finetune_recipe(updates: dict) -> str:
    recipe = str(updates.get("recipe", "auto"))
    if recipe != "auto":
        return recipe
    from mimscale.pretrain.models import MODEL_SIZES

    name = (updates.get("model") or {}).get("name", "auto")
    if name == "auto":
        ckpt = updates.get("checkpoint")
        if not ckpt or not Path(str(ckpt)).exists():
            return "mae_vit_base"  # validation reports the missing checkpoint
        from .weights import cached_weights

        name, _ = cached_weights(str(ckpt)).architecture()
    depth = MODEL_SIZES.get(name, {}).get("depth", 12)
    return "mae_vit_huge" if depth >= 32 else "mae_vit_large" if depth >= 24 else "mae_vit_base"


C = TypeVar("C")


def load_classify_config(cls: type[C], overrides: list[str] | None = None, file: str | None = None) -> C:
    """Defaults of ``cls`` <- its recipe <- YAML ``file`` <- ``key=value`` overrides, validated."""
    data: dict = {}
    if file:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"--config: file {path} does not exist")
        data = _yaml(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: top level must be a mapping")
    updates = _merge(data, parse_overrides(list(overrides or [])))
    cfg = cls()
    if cls is FinetuneConfig:
        recipe = _finetune_recipe(updates)
        if recipe not in FINETUNE_RECIPES:
            raise ConfigError(f"recipe: {recipe!r} is not valid; valid: auto, {', '.join(FINETUNE_RECIPES)}")
        _apply(cfg, FINETUNE_RECIPES[recipe])
        updates = {**updates, "recipe": recipe}
    _apply(cfg, updates)
    cfg.validate()
    return cfg


def config_hash(cfg) -> str:
    """12 hex digits identifying the protocol (everything but where outputs go)."""
    data = {k: v for k, v in to_dict(cfg).items() if k not in ("output", "resume")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]
