"""``mimscale segment``: ADE20K UperNet fine-tuning of a pretrained ViT (MAE / BEiT protocol).

Defaults: 512x512 crops, 160k iterations at 16 images per batch (8 GPUs x 2), AdamW lr 1e-4,
weight decay 0.05, layer decay 0.65, drop path 0.1, linear warmup 1500 iterations then poly
decay (power 1), features from blocks at ¼ ½ ¾ 1 of the depth, global attention, sliding-window
evaluation (crop 512, stride 341) on images resized to a 512 short side; mIoU, mAcc, aAcc.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
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
from mimscale.downstream.dense.encoder import PYRAMIDS, build_dense_encoder
from mimscale.downstream.dense.runner import FitSummary, fit

from .classes import label_names
from .data import ADE20KSegmentation, SegTrainTransform, collate, rescale_size
from .metrics import check_labels, confusion_matrix, majority_baseline, segmentation_metrics
from .model import UperNetSegmentor, slide_inference


@dataclass
class SegmentModelConfig:
    pyramid: str = _opt("multilevel", "features from blocks at ¼ ½ ¾ 1 depth (MAE/BEiT UperNet) or "
                        "ViTDet's simple pyramid from the last block", choices=PYRAMIDS)
    channels: int | None = _opt(None, "UperNet width; null = the encoder width (MAE/BEiT: 768 for ViT-B)", gt=0)
    pool_scales: list[int] = _opt([1, 2, 3, 6], "pyramid pooling output sizes")
    aux_channels: int = _opt(256, "auxiliary FCN head width", gt=0)
    aux_index: int = _opt(2, "pyramid level the auxiliary head reads (0 = stride 4)", ge=0, le=3)
    aux_weight: float = _opt(0.4, "auxiliary loss weight; 0 drops the head", ge=0)
    dropout: float = _opt(0.1, "dropout before the classifiers", ge=0, lt=1)


@dataclass
class SegmentDataConfig:
    root: str | None = _opt(None, "ADE20K root (ADEChallengeData2016): images/<split>/, annotations/<split>/")
    train_split: str = _opt("training", "training split")
    val_split: str = _opt("validation", "evaluation split")
    num_classes: int = _opt(150, "classes after reduce_zero_label (ADE20K: 150)", gt=0)
    reduce_zero_label: bool = _opt(True, "label 0 is 'other': ignore it and shift the classes down")
    crop_size: int = _opt(512, "square training crop and sliding-window size", gt=0)
    scale: tuple[int, int] = _opt((2048, 512), "resize bound (long, short) at ratio 1; test images use it as is")
    ratio_range: tuple[float, float] = _opt((0.5, 2.0), "training resize ratio range")
    cat_max_ratio: float = _opt(0.75, "largest share one class may take of a training crop", gt=0, le=1)
    photometric: bool = _opt(True, "mmseg's photometric distortion")
    test_stride: int = _opt(341, "sliding-window stride at test", gt=0)
    batch_size: int = _opt(2, "images per process (8 GPUs x 2 = 16)", gt=0)
    val_limit: int | None = _opt(None, "evaluate only the first N images (quick checks)", gt=0)


@dataclass
class SegmentScheduleConfig:
    iters: int = _opt(160000, "training iterations (160k; 80k for ablations)", ge=1)
    warmup_iters: int = _opt(1500, "linear warmup iterations", ge=0)
    power: float = _opt(1.0, "poly decay power after warmup", ge=0)
    min_lr_ratio: float = _opt(0.0, "lr floor as a fraction of the peak", ge=0, le=1)


def _segment_backbone() -> BackboneConfig:
    return BackboneConfig(window_size=0)


@dataclass
class SegmentConfig:
    backbone: BackboneConfig = field(default_factory=_segment_backbone)
    model: SegmentModelConfig = field(default_factory=SegmentModelConfig)
    data: SegmentDataConfig = field(default_factory=SegmentDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(weight_decay=0.05, layer_decay=0.65))
    schedule: SegmentScheduleConfig = field(default_factory=SegmentScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/segment", checkpoint_every=16000))
    resume: str = _opt("none", "'none', 'auto' (newest checkpoint in output.dir) or a checkpoint folder")
    eval_only: bool = _opt(False, "only evaluate (the weights of `resume`)")

    def validate(self) -> None:
        validate_backbone(self.backbone)
        if not self.data.root:
            raise ConfigError("data.root: required (an ADE20K-layout folder; `mimscale segment --synthetic N` "
                              "writes a generated one)")
        lo, hi = self.data.ratio_range
        if not 0 < lo <= hi:
            raise ConfigError(f"data.ratio_range: {list(self.data.ratio_range)} must satisfy 0 < min <= max")
        if self.data.test_stride > self.data.crop_size:
            raise ConfigError(f"data.test_stride: {self.data.test_stride} leaves gaps between windows of "
                              f"data.crop_size {self.data.crop_size}; it must be <= the crop size")


def load_segment_config(overrides: list[str] | None = None, file: str | None = None,
                       validate: bool = True) -> SegmentConfig:
    return load_task_config(SegmentConfig, overrides, file, validate)


class SegmentTask:
    name = "segment"

    def __init__(self, cfg: SegmentConfig):
        self.cfg = cfg
        self._label_checks = 8  # training batches whose labels are checked against data.num_classes

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        encoder = build_dense_encoder(self.cfg.backbone, m.pyramid, m.channels or 256)
        channels = m.channels or encoder.vit.embed_dim
        return UperNetSegmentor(encoder, self.cfg.data.num_classes, channels, m.pool_scales,
                                m.aux_channels, m.aux_index, m.aux_weight, m.dropout)

    def train_dataset(self) -> ADE20KSegmentation:
        d = self.cfg.data
        aug = SegTrainTransform(d.crop_size, d.scale, d.ratio_range, d.cat_max_ratio, d.photometric)
        return ADE20KSegmentation(d.root, d.train_split, d.reduce_zero_label, aug)

    collate = staticmethod(collate)

    def batch_size(self) -> int:
        return self.cfg.data.batch_size

    def total_iters(self, iters_per_epoch: int) -> int:
        return self.cfg.schedule.iters

    def lr_factor(self, it: int, total: int, iters_per_epoch: int) -> float:
        s = self.cfg.schedule
        if it < s.warmup_iters:
            return 1e-6 + (1 - 1e-6) * it / s.warmup_iters  # mmseg's LinearLR from 1e-6
        progress = (it - s.warmup_iters) / max(1, total - s.warmup_iters)
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * (1 - progress) ** s.power

    def loss(self, model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
        images, labels = batch
        if self._label_checks:  # the first batches, on the host, before the device sees them
            self._label_checks -= 1
            check_labels(labels, self.cfg.data.num_classes)
        return model(images.to(device), labels.to(device))  # through DDP's forward: gradients sync

    @torch.no_grad()
    def evaluate(self, model: nn.Module, backend) -> dict | None:
        d = self.cfg.data
        ds = ADE20KSegmentation(d.root, d.val_split, d.reduce_zero_label, limit=d.val_limit)
        env = backend.env
        was_training = model.training
        model.eval()
        conf = torch.zeros(d.num_classes, d.num_classes, dtype=torch.int64)
        for i in range(env.rank, len(ds), env.world_size):
            image, label = ds[i]
            h, w = rescale_size(*image.shape[-2:], d.scale)
            x = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False).to(backend.device)
            with backend.autocast():
                logits = slide_inference(model, x, d.crop_size, d.test_stride)
            logits = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False)
            conf += confusion_matrix(logits.argmax(1)[0].cpu(), label, d.num_classes)
        model.train(was_training)
        parts = backend.all_gather_object(conf)
        if not env.is_main:
            return None
        conf = sum(parts[1:], parts[0])
        metrics = segmentation_metrics(conf)
        base = majority_baseline(conf)
        names = label_names(d.root, d.num_classes, d.reduce_zero_label)
        table = write_per_class(Path(self.cfg.output.dir) / "per_class.csv", names, metrics)
        print(f"segment: {len(ds)} images of {d.val_split}: mIoU {100 * metrics['mIoU']:.2f}  "
              f"mAcc {100 * metrics['mAcc']:.2f}  aAcc {100 * metrics['aAcc']:.2f}  "
              f"(majority-class baseline mIoU {100 * base['mIoU']:.2f}); per class: {table}")
        return {**metrics, "majority_mIoU": base["mIoU"], "pixels": int(conf.sum()), "classes": names}


def write_per_class(path: Path, names: list[str] | None, metrics: dict) -> Path:
    """The per-class table: index, name (empty when unknown), IoU and Acc (empty where undefined)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "name", "IoU", "Acc"])
        for k, (iou, acc) in enumerate(zip(metrics["IoU"], metrics["Acc"])):
            w.writerow([k, names[k] if names else "", "" if iou is None else f"{iou:.6f}",
                        "" if acc is None else f"{acc:.6f}"])
    return path


def run_segment(cfg: SegmentConfig) -> FitSummary:
    return fit(SegmentTask(cfg))
