"""The iteration loop shared by detection and segmentation fine-tuning.

A task says how to build its model and data, what its loss is, how its lr moves and how it is
evaluated; this loop does the rest with the pretraining engine's pieces (DDP backend, atomic
checkpoints, JSONL/TensorBoard logger), so both commands run single-process or under torchrun.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from mimscale.config import to_dict, to_yaml
from mimscale.pretrain.engine.backend import DDPBackend, DistEnv, build_backend, init_distributed
from mimscale.pretrain.engine.checkpoint import CheckpointManager, load_checkpoint, resolve_resume
from mimscale.pretrain.engine.data_wait import DataWait
from mimscale.pretrain.engine.logger import RunLogger
from mimscale.pretrain.engine.rng import seed_everything

from .optim import layer_decay_param_groups


class DenseTask(Protocol):
    """What a task provides to :func:`fit`. ``cfg`` has ``engine``, ``optim``, ``output`` sections
    and ``resume`` / ``eval_only`` keys."""

    name: str
    cfg: Any

    def build_model(self) -> nn.Module: ...
    def train_dataset(self) -> Dataset: ...
    def collate(self, items: list) -> Any: ...
    def batch_size(self) -> int: ...
    def total_iters(self, iters_per_epoch: int) -> int: ...
    def lr_factor(self, it: int, total: int, iters_per_epoch: int) -> float: ...
    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]: ...
    def evaluate(self, model: nn.Module, backend: DDPBackend) -> dict | None: ...


class EpochShardSampler(Sampler[int]):
    """A seeded permutation per epoch, padded to whole global batches, split over ranks; can
    start at a batch inside the epoch, so a resumed run sees exactly the remaining samples."""

    def __init__(self, size: int, batch: int, rank: int, world: int, seed: int):
        if size == 0:
            raise ValueError("the training set is empty")
        self.size, self.batch, self.rank, self.world, self.seed = size, batch, rank, world, seed
        self.iters_per_epoch = math.ceil(size / (batch * world))
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start = epoch, start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)
        total = self.iters_per_epoch * self.batch * self.world
        order = order.repeat(math.ceil(total / self.size))[:total]
        mine = order.view(self.iters_per_epoch, self.world, self.batch)[self.start:, self.rank]
        return iter(mine.flatten().tolist())

    def __len__(self) -> int:
        return (self.iters_per_epoch - self.start) * self.batch


@dataclass
class FitSummary:
    run_dir: Path
    iters: int
    checkpoint: Path | None
    metrics: dict | None
    losses: list[tuple[int, float]]
    wall_time: float
    model: nn.Module | None = None  # the fine-tuned model, unwrapped


def _device_type(name: str) -> str:
    return "cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu"


def fit(task: DenseTask) -> FitSummary:
    """Train (unless ``eval_only``), checkpoint atomically, evaluate; the metrics land in
    ``<run>/eval.json`` and ``metrics.jsonl``."""
    cfg = task.cfg
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    env = init_distributed(_device_type(cfg.engine.device))
    backend = build_backend(cfg.engine, env)
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.engine.seed)  # same initial heads on every rank
    model = task.build_model()
    if env.world_size > 1 and backend.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    wrapped = backend.wrap(model)
    depth = backend.module.backbone.vit.num_layers
    groups = layer_decay_param_groups(backend.module, cfg.optim.lr, cfg.optim.weight_decay,
                                      cfg.optim.layer_decay, depth, backbone_prefix="backbone.vit.")
    backend.build_optimizer(groups, cfg.optim.lr, cfg.optim.betas)
    checkpoints = CheckpointManager(run_dir / "checkpoints", cfg.output.keep_last)
    start = 0
    resume_from = resolve_resume(cfg.resume, checkpoints)
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        backend.module.load_state_dict(state["model"])
        start = int(state["iter"])
        if not cfg.eval_only:
            backend.optimizer.load_state_dict(state["optimizer"])
    elif cfg.eval_only:
        print(f"{task.name}: eval_only without resume evaluates the un-fine-tuned model")
    if env.is_main:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    t0 = time.time()
    losses: list[tuple[int, float]] = []
    it, total, ckpt = start, start, None
    if not cfg.eval_only:
        it, total, losses, ckpt = _train(task, wrapped, backend, env, checkpoints, start, run_dir)
    metrics = task.evaluate(backend.module, backend)
    if env.is_main and metrics is not None:
        (run_dir / "eval.json").write_text(json.dumps({"iter": it, **metrics}, indent=2))
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": it, "time": round(time.time(), 3), "eval": metrics}) + "\n")
    backend.barrier()
    return FitSummary(run_dir, it, ckpt, metrics, losses, time.time() - t0, backend.module)


def _train(task, model, backend: DDPBackend, env: DistEnv, checkpoints: CheckpointManager,
           start: int, run_dir: Path):
    cfg = task.cfg
    dataset = task.train_dataset()
    batch = task.batch_size()
    sampler = EpochShardSampler(len(dataset), batch, env.rank, env.world_size, cfg.engine.seed)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, collate_fn=task.collate,
                        num_workers=cfg.engine.num_workers, persistent_workers=False,
                        worker_init_fn=_seed_worker)
    ipe = sampler.iters_per_epoch
    total = task.total_iters(ipe)
    seed_everything(cfg.engine.seed + 1000 * env.rank + start)  # per-rank augmentation / drop path
    logger = RunLogger(run_dir, env.is_main, total, start, progress=cfg.output.progress)
    logger.print(f"{task.name}: {len(dataset)} training images, {batch} per rank x {env.world_size} "
                 f"rank(s), {ipe} iterations per epoch, {total} iterations, lr {cfg.optim.lr:g}")
    it, losses, ckpt = start, [], None
    window: dict[str, float] = {}
    model.train()
    tick, wait = time.time(), DataWait()
    while it < total:
        epoch, offset = divmod(it, ipe)
        sampler.set_position(epoch, offset)
        for data in wait.iterate(loader):
            backend.set_lr(cfg.optim.lr * task.lr_factor(it, total, ipe))
            with backend.autocast():
                terms = task.loss(model, data, backend.device)
            loss = sum(terms.values())
            loss.backward()
            grad_norm = backend.step(cfg.optim.clip_grad)
            it += 1
            wait.step()
            for k, v in terms.items():
                window[k] = window.get(k, 0.0) + float(v.detach())
            if it % cfg.output.log_every == 0 or it == total:
                n = (it - 1) % cfg.output.log_every + 1
                means = {k: v / n for k, v in window.items()}
                record = {"epoch": it / ipe, "loss": sum(means.values()), **means,
                          "lr": backend.optimizer.param_groups[-1]["lr"], "grad_norm": float(grad_norm),
                          "iters_per_s": n / max(time.time() - tick, 1e-9), "data_wait_ms": wait.flush_ms()}
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"{task.name}: loss is {record['loss']} at iteration {it}; "
                                             "lower optim.lr or set optim.clip_grad")
                losses.append((it, record["loss"]))
                logger.log(it, record)
                window, tick = {}, time.time()
            else:
                logger.advance(it)
            if it % cfg.output.checkpoint_every == 0 or it == total:
                ckpt = _save(checkpoints, backend, env, it, cfg)
            if it >= total:
                break
    logger.close()
    return it, total, losses, ckpt


def _save(checkpoints: CheckpointManager, backend: DDPBackend, env: DistEnv, it: int, cfg) -> Path | None:
    path = None
    if env.is_main:
        state = {"model": backend.module.state_dict(), "optimizer": backend.optimizer.state_dict(),
                 "iter": it, "config": to_dict(cfg)}
        path = checkpoints.save(it, state, to_yaml(cfg))
    backend.barrier()
    return path


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
