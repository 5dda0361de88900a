"""``mimscale detect``: COCO Mask R-CNN fine-tuning of a pretrained ViT (ViTDet protocol).

Defaults are the 1x schedule (12 epochs, lr x0.1 at epochs 9 and 11) with large-scale jitter at
1024 px, AdamW lr 1e-4, weight decay 0.1, layer decay 0.7 and drop path 0.1 (ViTDet's ViT-B
settings); ViT-L uses layer decay 0.8 and drop path 0.4 (docs/dense.md has the commands).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch
from torch import nn

from mimscale.config import ConfigError, _opt
from mimscale.downstream.dense.config import (
    BackboneConfig,
    EngineConfig,
    OptimConfig,
    OutputConfig,
    load_task_config,
    validate_backbone,
)
from mimscale.downstream.dense.encoder import build_dense_encoder
from mimscale.downstream.dense.runner import FitSummary, fit

from .data import CocoInstances, LargeScaleJitter, RandomFlip, coco_paths, collate
from .evaluate import coco_metrics, format_metrics, to_coco_results
from .model import build_mask_rcnn


@dataclass
class DetectModelConfig:
    fpn_channels: int = _opt(256, "channels of every pyramid level", gt=0)
    anchor_sizes: list[int] = _opt([32, 64, 128, 256, 512], "anchor side per level (strides 4..64)")
    rpn_convs: int = _opt(2, "convs in the RPN head (ViTDet: 2)", ge=1)
    box_convs: int = _opt(4, "convs in the box head before its fc (ViTDet: 4conv1fc)", ge=0)
    mask_convs: int = _opt(4, "convs in the mask head", ge=1)
    head_channels: int = _opt(256, "channels of the box and mask head convs", gt=0)
    fc_dim: int = _opt(1024, "width of the box head fc", gt=0)
    proposals_train: int = _opt(2000, "RPN proposals kept per image in training (pre and post NMS)", gt=0)
    proposals_test: int = _opt(1000, "RPN proposals kept per image at test", gt=0)
    rpn_batch_size_per_image: int = _opt(256, "anchors sampled per image for the RPN loss", gt=0)
    box_batch_size_per_image: int = _opt(512, "proposals sampled per image for the box/mask losses", gt=0)
    detections_per_image: int = _opt(100, "detections kept per image (COCO: 100)", gt=0)
    score_threshold: float = _opt(0.05, "detections below this score are dropped", ge=0, lt=1)


@dataclass
class DetectDataConfig:
    root: str | None = _opt(None, "COCO root: <root>/<split>/ images, <root>/annotations/instances_<split>.json")
    train_split: str = _opt("train2017", "training split name")
    val_split: str = _opt("val2017", "evaluation split name")
    augment: str = _opt("lsj", "large-scale jitter at image_size (ViTDet) or multi-scale short sides "
                        "(Mask R-CNN classic)", choices=("lsj", "multiscale"))
    image_size: int = _opt(1024, "lsj: square training crop and longest test side", gt=0)
    lsj_scale: tuple[float, float] = _opt((0.1, 2.0), "lsj: range of the resize factor")
    multiscale_sizes: list[int] = _opt([480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
                                       "multiscale: training short sides; the last one at test")
    max_size: int = _opt(1333, "multiscale: longest side cap", gt=0)
    batch_size: int = _opt(2, "images per process (8 GPUs x 2 = the 1x batch of 16)", gt=0)
    val_limit: int | None = _opt(None, "evaluate only the first N images (quick checks)", gt=0)


@dataclass
class DetectScheduleConfig:
    epochs: int = _opt(12, "training epochs (1x = 12)", ge=1)
    max_iters: int | None = _opt(None, "iterations; overrides epochs (lr steps keep their fraction)", ge=1)
    lr_steps: list[float] = _opt([9.0, 11.0], "epochs at which the lr is multiplied by lr_gamma")
    lr_gamma: float = _opt(0.1, "lr step factor", gt=0, le=1)
    warmup_iters: int = _opt(250, "linear warmup iterations", ge=0)
    warmup_factor: float = _opt(0.001, "lr factor at the first warmup iteration", gt=0, le=1)


@dataclass
class DetectConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: DetectModelConfig = field(default_factory=DetectModelConfig)
    data: DetectDataConfig = field(default_factory=DetectDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: DetectScheduleConfig = field(default_factory=DetectScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/detect"))
    resume: str = _opt("none", "'none', 'auto' (newest checkpoint in output.dir) or a checkpoint folder")
    eval_only: bool = _opt(False, "only evaluate (the weights of `resume`)")

    def validate(self) -> None:
        validate_backbone(self.backbone)
        if not self.data.root:
            raise ConfigError("data.root: required (a COCO-layout folder; `mimscale detect --synthetic N` "
                              "writes a generated one)")
        lo, hi = self.data.lsj_scale
        if not 0 < lo <= hi:
            raise ConfigError(f"data.lsj_scale: {list(self.data.lsj_scale)} must satisfy 0 < min <= max")
        if len(self.model.anchor_sizes) != 5:
            raise ConfigError(f"model.anchor_sizes: needs 5 sizes (strides 4, 8, 16, 32, 64), got {self.model.anchor_sizes}")


def load_detect_config(overrides: list[str] | None = None, file: str | None = None,
                       validate: bool = True) -> DetectConfig:
    return load_task_config(DetectConfig, overrides, file, validate)


class DetectTask:
    name = "detect"

    def __init__(self, cfg: DetectConfig):
        self.cfg = cfg
        d = cfg.data
        self.train_files = coco_paths(d.root, d.train_split) if not cfg.eval_only else None
        self.val_files = coco_paths(d.root, d.val_split)
        self._val = None

    def _sizes(self):
        d = self.cfg.data
        if d.augment == "lsj":
            return (d.image_size,), d.image_size
        return tuple(d.multiscale_sizes), d.max_size

    def val_dataset(self) -> CocoInstances:
        if self._val is None:
            self._val = CocoInstances(*self.val_files, train=False, limit=self.cfg.data.val_limit)
        return self._val

    def build_model(self) -> nn.Module:
        encoder = build_dense_encoder(self.cfg.backbone, "simple", self.cfg.model.fpn_channels)
        num_classes = self.val_dataset().num_classes
        min_size, max_size = self._sizes()
        return build_mask_rcnn(encoder, num_classes, self.cfg.model, min_size, max_size)

    def train_dataset(self) -> CocoInstances:
        d = self.cfg.data
        aug = LargeScaleJitter(d.image_size, d.lsj_scale) if d.augment == "lsj" else RandomFlip()
        ds = CocoInstances(*self.train_files, transform=aug, train=True)
        if ds.cat_ids != self.val_dataset().cat_ids:
            raise ValueError(f"train and val splits have different categories: {ds.cat_ids} vs {self.val_dataset().cat_ids}")
        return ds

    collate = staticmethod(collate)

    def batch_size(self) -> int:
        return self.cfg.data.batch_size

    def total_iters(self, iters_per_epoch: int) -> int:
        return self.cfg.schedule.max_iters or self.cfg.schedule.epochs * iters_per_epoch

    def lr_factor(self, it: int, total: int, iters_per_epoch: int) -> float:
        s = self.cfg.schedule
        milestones = [round(e / s.epochs * total) for e in sorted(s.lr_steps)]
        factor = s.lr_gamma ** bisect.bisect_right(milestones, it)
        if it < s.warmup_iters:
            alpha = it / s.warmup_iters
            factor *= s.warmup_factor * (1 - alpha) + alpha
        return factor

    def loss(self, model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        return model(images, targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, backend) -> dict | None:
        ds = self.val_dataset()
        env = backend.env
        was_training = model.training
        model.eval()
        results = []
        for i in range(env.rank, len(ds), env.world_size):
            image, target = ds[i]
            with backend.autocast():
                out = model([image.to(backend.device)])[0]
            results += to_coco_results(out, target["image_id"], ds.cat_ids)
        model.train(was_training)
        gathered = backend.all_gather_object(results)
        if not env.is_main:
            return None
        metrics = coco_metrics(ds.coco, [r for part in gathered for r in part], image_ids=ds.ids)
        print(f"detect: COCO evaluation on {len(ds)} images of {self.cfg.data.val_split}\n{format_metrics(metrics)}")
        return metrics


def run_detect(cfg: DetectConfig) -> FitSummary:
    return fit(DetectTask(cfg))
