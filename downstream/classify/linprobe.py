"""``mimscale linprobe``: a linear classifier on a frozen encoder (MAE's protocol): the CLS token
(or the mean patch token) after the final norm, ``BatchNorm1d(affine=False)``, one linear layer,
LARS, a cosine schedule with warmup.

With ``cache_features`` the encoder runs once over both splits (evaluation transform, no
augmentation; stored in ``<output.dir>/features/`` and reused while the encoder and data stay the
same) and the head trains on the stored features: far faster, but not MAE's augmented protocol.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from .common import Run, report, start
from .config import LinprobeConfig
from .data import eval_transform, linprobe_transform, load_splits
from .engine import FitResult, Job, fit
from .features import extract, fingerprint, gather_rows, shard_indices
from .model import LinearProbe, build_vit, load_weights
from .optim import LARS
from .subsets import training_subset


def _lars(o):
    def make(backend, lr):
        params = [p for p in backend.module.parameters() if p.requires_grad]
        options = dict(lr=lr, weight_decay=o.weight_decay, momentum=o.momentum, trust_coefficient=o.trust_coefficient)
        if backend.name == "deepspeed":
            # ZeRO steps a flat slice of each group on each rank: one weight per group, so that
            # LARS can sum its norms over the ranks
            groups = [{"params": [p], "adapt": p.ndim > 1, "numel": p.numel()} for p in params]
            return backend.initialize(LARS(groups, **options))
        backend.optimizer = LARS(params, **options)
        return backend.optimizer
    return make


def _features(run: Run, cfg: LinprobeConfig, encoder, digest: str, dataset, split: str) -> TensorDataset:
    """All features of ``dataset`` on every rank; computed once and cached in the run folder. The
    cache is keyed by the encoder's weights (``digest``), the samples and everything else that
    changes a feature, so a stale one is never read."""
    folder = run.run_dir / "features"
    samples = hashlib.sha256(json.dumps([dataset.keys, dataset.labels]).encode()).hexdigest()
    key = {"encoder": digest, "samples": samples, "pool": cfg.model.pool, "img": run.img_size,
           "crop_pct": cfg.data.crop_pct, "precision": cfg.engine.precision, "dataset": cfg.data.dataset,
           "split": split, "n": len(dataset)}
    path = Path(folder) / f"{split}.pt"
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == key:
            run.say(f"linprobe: cached features of {split} from {path}")
            return TensorDataset(cached["features"], cached["labels"])
    mine = shard_indices(len(dataset), run.env.rank, run.env.world_size)
    feats, labels = extract(encoder, dataset, mine, cfg.data.batch_size, run.backend.device,
                            run.backend.autocast, cfg.data.num_workers)
    feats, labels = gather_rows(feats, len(dataset)).cpu(), gather_rows(labels, len(dataset)).cpu()
    if run.env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".pt.tmp")
        torch.save({"key": key, "features": feats, "labels": labels}, tmp)
        tmp.replace(path)
    return TensorDataset(feats, labels)


def run_linprobe(cfg: LinprobeConfig) -> FitResult:
    run = start(cfg)
    d = cfg.data
    train, eval_set = load_splits(d, True, run.env.is_main, run.backend.barrier)
    train = training_subset(train, d.subset, d.subset_file, d.subset_seed,
                            run.run_dir / "subset.txt" if run.env.is_main else None)
    encoder = build_vit(run.model, run.patch_size, run.img_size, 0, cfg.model.pool, fc_norm=False)
    if run.weights is not None:
        load_weights(encoder, run.weights)
        run.say(f"linprobe: frozen {run.weights.kind} encoder from {run.weights.label}")
    encoder = encoder.to(run.backend.device)
    num_classes, dim = eval_set.num_classes, encoder.num_features
    eval_set.transform = eval_transform(run.img_size, d.crop_pct)
    if cfg.cache_features:
        # the head first: extraction draws from the global RNG, a cache hit does not
        model = LinearProbe(None, dim, num_classes)
        train.transform = eval_transform(run.img_size, d.crop_pct)
        digest = fingerprint(encoder)
        train_data = _features(run, cfg, encoder, digest, train, "train")
        eval_data = _features(run, cfg, encoder, digest, eval_set, "eval")
    else:
        train.transform = linprobe_transform(run.img_size, tuple(cfg.crop_scale), cfg.hflip)
        train_data, eval_data = train, eval_set
        model = LinearProbe(encoder, dim, num_classes)
    meta = {"protocol": "linprobe", "model": run.model, "patch_size": run.patch_size, "img_size": run.img_size,
            "pool": cfg.model.pool, "num_classes": num_classes, "classes": eval_set.classes,
            "dataset": d.dataset, **run.provenance()}
    job = Job("linprobe", model, train_data, eval_data, _lars(cfg.optim), torch.nn.CrossEntropyLoss(), meta,
              keep_key=lambda k: not k.startswith("encoder."))
    fitted = fit(job, cfg, run.backend)
    if not fitted.preempted:
        extra = {"subset_size": len(train)} if d.subset or d.subset_file else {}
        report(run, cfg, "linprobe", fitted.metrics, round(fitted.epochs, 3),
               features="cached" if cfg.cache_features else "augmented", **extra)
    run.backend.barrier()
    return fitted
