"""``mimscale finetune``: end-to-end fine-tuning of a pretrained ViT (MAE's protocol), then its
robustness to occlusion and patch shuffling.

The classifier is timm's ``VisionTransformer`` with the encoder's weights; layer-wise lr decay,
drop path, timm's mixup/cutmix and label smoothing, AdamW, a cosine schedule with warmup, an
optional EMA of the weights, bf16 autocast. ``eval_only`` evaluates a fine-tuned classifier (a
``mimscale finetune`` checkpoint, or an MAE fine-tuned ``.pth``) without training.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .common import Run, report, start
from .config import FinetuneConfig
from .data import eval_transform, finetune_transform, load_splits
from .engine import FitResult, Job, evaluate, fit
from .model import build_vit, init_head, load_weights
from .optim import layer_decay_groups
from .robustness import perturbed_forward
from .subsets import training_subset


@dataclass
class FinetuneSummary:
    model: nn.Module                   # the (fine-tuned) classifier
    metrics: dict
    ema_metrics: dict | None
    robustness: dict[str, dict]
    fit: FitResult | None
    results: list


def _criterion(a, mixing: bool) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixing:
        return SoftTargetCrossEntropy()  # smoothing is applied by the mixup targets
    if a.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=a.smoothing)
    return nn.CrossEntropyLoss()


def _mixup(a, num_classes: int):
    if not (a.mixup > 0 or a.cutmix > 0 or a.cutmix_minmax is not None):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix,
                 cutmix_minmax=tuple(a.cutmix_minmax) if a.cutmix_minmax else None,
                 prob=a.mixup_prob, switch_prob=a.mixup_switch_prob, mode=a.mixup_mode,
                 label_smoothing=a.smoothing, num_classes=num_classes)


def _adamw(o):
    """AdamW over layer-decay groups (``lr_scale`` per group, read by the backend's ``set_lr``)."""
    def make(backend, lr):
        groups = layer_decay_groups(backend.module, o.weight_decay, o.layer_decay)
        return backend.build_optimizer(groups, lr, tuple(o.betas))
    return make


def _classifier(run: Run, cfg: FinetuneConfig, num_classes: int, classes: list[str]) -> tuple[nn.Module, dict]:
    m, w = cfg.model, run.weights
    with_head = bool(cfg.eval_only and w is not None and w.kind in ("classifier", "mae", "timm") and w.has_head)
    pool = w.meta.get("pool", m.pool) if with_head and w.kind == "classifier" else m.pool
    vit = build_vit(run.model, run.patch_size, run.img_size, num_classes, pool, m.drop_path)
    init_head(vit.head, m.head_init_std)
    if cfg.eval_only and not with_head:
        raise ValueError(f"eval_only: {w.label if w else 'no checkpoint'} holds no classifier head; give "
                         "checkpoint=<a mimscale finetune run or checkpoint, or an MAE fine-tuned .pth>")
    if w is not None:
        if with_head and w.state["head.weight"].shape[0] != num_classes:
            raise ValueError(f"{w.label} classifies {w.state['head.weight'].shape[0]} classes, "
                             f"{cfg.data.dataset} has {num_classes}")
        fresh = load_weights(vit, w, with_head=with_head)
        run.say(f"finetune: {w.kind} weights from {w.label}; initialised fresh: {', '.join(fresh) or 'nothing'}")
    meta = {"protocol": "finetune", "model": run.model, "patch_size": run.patch_size, "img_size": run.img_size,
            "pool": pool, "num_classes": num_classes, "classes": classes, "dataset": cfg.data.dataset,
            **run.provenance()}
    return vit, meta


def robustness(run: Run, cfg: FinetuneConfig, vit: nn.Module, eval_set) -> dict[str, dict]:
    """Top-1/top-5 with ``eval.occlusion`` of the patches dropped, and with the patches shuffled."""
    vit.eval()
    out = {}
    for name, kind in ((f"occlude{round(100 * cfg.eval.occlusion)}", "occlude"), ("shuffle", "shuffle")):
        gen = torch.Generator().manual_seed(cfg.engine.seed * 1000 + run.env.rank)
        perturb = partial(perturbed_forward, perturbation=kind, ratio=cfg.eval.occlusion, generator=gen)
        forward = lambda x, perturb=perturb: vit(x, perturb)  # through forward: FSDP and ZeRO-3 gather there
        out[name] = evaluate(forward, eval_set, run.backend, cfg.data.batch_size, cfg.data.num_workers)
    return out


def run_finetune(cfg: FinetuneConfig) -> FinetuneSummary:
    run = start(cfg)
    d = cfg.data
    train, eval_set = load_splits(d, not cfg.eval_only, run.env.is_main, run.backend.barrier)
    eval_set.transform = eval_transform(run.img_size, d.crop_pct)
    vit, meta = _classifier(run, cfg, eval_set.num_classes, eval_set.classes)
    results, fitted, ema_metrics = [], None, None
    if cfg.eval_only:
        run.backend.wrap(vit)
        vit.eval()
        metrics = evaluate(vit, eval_set, run.backend, d.batch_size, d.num_workers)
        epochs = None
    else:
        train = training_subset(train, d.subset, d.subset_file, d.subset_seed,
                                run.run_dir / "subset.txt" if run.env.is_main else None)
        train.transform = finetune_transform(run.img_size, cfg.augment)
        mixup = _mixup(cfg.augment, eval_set.num_classes)
        job = Job("finetune", vit, train, eval_set, _adamw(cfg.optim),
                  _criterion(cfg.augment, mixup is not None), meta, mixup,
                  cfg.ema.decay if cfg.ema.enabled else None)
        fitted = fit(job, cfg, run.backend)
        if fitted.preempted:
            return FinetuneSummary(vit, {}, None, {}, fitted, [])
        metrics, ema_metrics, epochs = fitted.metrics, fitted.ema_metrics, round(fitted.epochs, 3)
    extra = {"subset_size": len(train)} if train is not None and (d.subset or d.subset_file) else {}
    results.append(report(run, cfg, "finetune", metrics, epochs, **extra))
    if ema_metrics is not None:
        results.append(report(run, cfg, "finetune", ema_metrics, epochs, variant="ema", **extra))
    robust = robustness(run, cfg, run.backend.module, eval_set) if cfg.eval.robustness else {}
    for variant, m in robust.items():
        results.append(report(run, cfg, "finetune", m, epochs, variant=variant, **extra))
    run.backend.barrier()
    return FinetuneSummary(run.backend.module, metrics, ema_metrics, robust, fitted, [r for r in results if r])
