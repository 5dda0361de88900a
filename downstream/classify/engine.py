"""The epoch loop shared by fine-tuning and linear probing, on the pretraining engine's pieces:
the backend (DDP, FSDP, DeepSpeed ZeRO or one process; autocast, accumulation, clipping, skipped
non-finite steps), the cosine schedule, atomic checkpoints, the JSONL/TensorBoard logger, and the data plan's
exactly-once sampler.

A checkpoint records the step (the position inside the epoch follows) and the random state, so a
run stopped by a preemption signal continues with ``resume=auto`` at the same step with the same
data order; with ``data.num_workers=0`` it continues exactly as if never stopped (loader workers draw
their augmentations from their own seeds).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from timm.models.vision_transformer import Block
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader, Dataset, Subset

from mimscale.config import to_dict, to_yaml
from mimscale.data_pipeline.loader import EpochSampler
from mimscale.data_pipeline.plan import mix_seed
from mimscale.pretrain.engine.backend import Backend
from mimscale.pretrain.engine.checkpoint import CheckpointManager, read_state, resolve_resume
from mimscale.pretrain.engine.data_wait import DataWait
from mimscale.pretrain.engine.guard import NumericsGuard, poison_nonfinite
from mimscale.pretrain.engine.logger import RunLogger
from mimscale.pretrain.engine.preemption import PreemptionHandler
from mimscale.pretrain.engine.rng import rng_state, set_rng_state
from mimscale.pretrain.engine.schedule import cosine_lr, scaled_lr

from .features import shard_indices

PREEMPT_SIGNALS = ["SIGUSR2", "SIGTERM"]


@dataclass
class Job:
    """What a protocol trains: ``model(inputs) -> logits`` and the pieces around it."""

    protocol: str
    model: nn.Module
    train_set: Dataset
    eval_set: Dataset
    make_optimizer: Callable[[Backend, float], torch.optim.Optimizer]  # sets backend.optimizer
    criterion: nn.Module
    meta: dict                                        # written into every checkpoint as "classifier"
    mixup: Callable | None = None
    ema_decay: float | None = None
    keep_key: Callable[[str], bool] = lambda key: True  # which state-dict keys a checkpoint holds


@dataclass
class FitResult:
    metrics: dict                      # top1, top5 (percent), n, of the final weights
    ema_metrics: dict | None
    steps: int
    epochs: float
    checkpoint: Path | None
    preempted: str | None = None
    history: list[dict] = field(default_factory=list)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """How many of the targets are among the top-k logits, for each k (k capped at the classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == targets[:, None]
    return torch.stack([hit[:, :min(k, logits.shape[1])].any(dim=1).sum() for k in ks]).float()


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, backend: Backend,
             batch_size: int, num_workers: int = 0) -> dict:
    """Top-1 / top-5 accuracy (percent) over every sample once, the ranks' shares summed.

    Every rank runs the same number of forwards (a sharded model's forward is collective): a
    share one sample short repeats one at its end, which is not counted."""
    env = backend.env
    mine = shard_indices(len(dataset), env.rank, env.world_size)
    rows = -(-len(dataset) // env.world_size)
    padded = mine + mine[:1] * (rows - len(mine)) if mine else [0] * rows
    loader = DataLoader(Subset(dataset, padded), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    sums = torch.zeros(3, device=backend.device)  # top1, top5, count
    seen = 0
    for images, targets in loader:
        images, targets = images.to(backend.device, non_blocking=True), targets.to(backend.device)
        with backend.autocast():
            logits = forward(images)
        real = max(0, min(len(targets), len(mine) - seen))
        seen += len(targets)
        sums[:2] += topk_correct(logits[:real].float(), targets[:real])
        sums[2] += real
    if env.world_size > 1:
        dist.all_reduce(sums)
    top1, top5, n = sums.tolist()
    return {"top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1), "n": int(n)}


class _Trainer:
    def __init__(self, job: Job, cfg, backend: Backend):
        self.job, self.cfg, self.backend, self.env = job, cfg, backend, backend.env
        d, o = cfg.data, cfg.optim
        self.run_dir = Path(cfg.output.dir)
        self.sampler = EpochSampler(len(job.train_set), cfg.engine.seed, self.env.rank, self.env.world_size)
        self.micro_per_epoch = self.sampler.per_rank // d.batch_size
        self.steps_per_epoch = self.micro_per_epoch // o.accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(job.train_set)} training samples do not fill one optimizer step of "
                f"{self.env.world_size} rank(s) x data.batch_size={d.batch_size} x optim.accum_steps="
                f"{o.accum_steps}; lower the batch size")
        s = cfg.schedule
        self.total = s.max_steps or s.epochs * self.steps_per_epoch
        self.warmup = round(s.warmup_epochs * self.steps_per_epoch)
        self.effective_batch = d.batch_size * o.accum_steps * self.env.world_size
        self.lr = o.lr or scaled_lr(o.blr, self.effective_batch)
        self.sharded = backend.checkpoint_format != "full"
        _wrap(backend, job.model)
        job.make_optimizer(backend, self.lr)
        self.model = backend.model  # what the loop calls: DDP's or DeepSpeed's wrapper (built with the optimizer)
        self.ema = None
        if job.ema_decay:
            if self.sharded:
                raise ValueError(f"an EMA of the weights is not kept with engine.backend={backend.name}; "
                                 "use engine.backend=ddp for ema.enabled=true")
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(backend.module, decay=job.ema_decay)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.output.keep_last)
        self.guard = NumericsGuard(cfg.engine.max_nonfinite_steps)
        self.step, self.history = 0, []

    # ------------------------------------------------------------------ state
    def _filtered(self, state: dict) -> dict:
        return {k: v for k, v in state.items() if self.job.keep_key(k)}

    def _run_state(self) -> dict:
        return {"step": self.step, "guard": self.guard.state_dict(), "history": self.history,
                "rng": rng_state(),  # every rank draws alike (seeded alike), so one copy serves all
                "config": to_dict(self.cfg), "classifier": self.job.meta,
                "layout": {"world_size": self.env.world_size, "batch_size": self.cfg.data.batch_size,
                           "accum_steps": self.cfg.optim.accum_steps}}

    def save(self) -> Path:
        if self.sharded:
            return self._save_sharded()
        path = self.checkpoints.path_for(self.step)
        if self.env.is_main:
            state = {"model": self._filtered(self.backend.module.state_dict()),
                     "optimizer": self.backend.optimizer.state_dict(),
                     "ema": self._filtered(self.ema.module.state_dict()) if self.ema is not None else None,
                     **self._run_state()}
            self.checkpoints.save(self.step, state, to_yaml(self.cfg))
        self.backend.barrier()
        return path

    def _save_sharded(self) -> Path:
        """The backend's shards of model and optimizer in the folder (fsdp's reshard to any number
        of ranks, deepspeed's load on as many as wrote them), and the full weights in state.pt, so
        the checkpoint reads like a ddp one (``read_weights``, eval-only runs). Collective."""
        tmp = self.checkpoints.staging_path(self.step)
        if self.env.is_main:
            self.checkpoints.stage(self.step)
        self.backend.barrier()
        self.backend.save(tmp)
        weights = full_weights(self.backend)
        if self.env.is_main:
            state = {"model": self._filtered(weights), "train_state": self.backend.checkpoint_format,
                     **self._run_state()}
            self.checkpoints.commit(self.step, tmp, state, to_yaml(self.cfg))
        self.backend.barrier()
        return self.checkpoints.path_for(self.step)

    def _restore_weights(self, path: Path, state: dict) -> None:
        """Model and optimizer, from whichever layout the checkpoint has."""
        shards = state.get("train_state")  # "dcp" or "deepspeed": model and optimizer are shards in the folder
        if shards is not None:  # ddp reads dcp shards consolidated
            self.backend.load(path, {"format": shards, "world_size": state["layout"]["world_size"]})
            return
        if self.sharded:
            raise ValueError(f"checkpoint {path} was written by engine.backend=ddp; resume it with ddp (to "
                             f"fine-tune its encoder with engine.backend={self.backend.name}, give it as checkpoint=)")
        missing, unexpected = self.backend.module.load_state_dict(state["model"], strict=False)
        missing = [k for k in missing if self.job.keep_key(k)]
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not fit this {self.job.protocol} model: missing "
                             f"{missing[:5]}, unexpected {list(unexpected)[:5]}")
        self.backend.optimizer.load_state_dict(state["optimizer"])

    def restore(self, path: Path) -> None:
        state = read_state(path)
        self._restore_weights(path, state)
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"], strict=False)
        self.step = int(state["step"])
        self.guard.load_state_dict(state.get("guard", {}))
        self.history = list(state.get("history", []))
        if "rng" in state:
            set_rng_state(state["rng"])
        layout = state.get("layout", {})
        now = {"world_size": self.env.world_size, "batch_size": self.cfg.data.batch_size,
               "accum_steps": self.cfg.optim.accum_steps}
        if layout and layout != now and self.step % self.steps_per_epoch:
            raise ValueError(f"checkpoint {path} was written mid-epoch with {layout}; resume it with the "
                             f"same ranks and batch ({now} now) to keep the data order")

    # ------------------------------------------------------------------ loop
    def _loader(self, epoch: int, start_micro: int):
        self.sampler.set_epoch(epoch, start_micro * self.cfg.data.batch_size)
        seed = mix_seed(self.cfg.engine.seed, epoch, self.env.rank, start_micro)
        return DataLoader(self.job.train_set, batch_size=self.cfg.data.batch_size, sampler=self.sampler,
                          drop_last=True, num_workers=self.cfg.data.num_workers,
                          pin_memory=self.backend.device.type == "cuda",
                          generator=torch.Generator().manual_seed(seed))

    def _micro(self, images, targets, sync: bool) -> torch.Tensor:
        images = images.to(self.backend.device, non_blocking=True)
        targets = targets.to(self.backend.device, non_blocking=True)
        if self.job.mixup is not None:
            images, targets = self.job.mixup(images, targets)
        with self.backend.accumulate(sync):
            with self.backend.autocast():
                logits = self.model(images)
            loss = self.job.criterion(logits.float(), targets)
            self.backend.backward(poison_nonfinite(loss), 1.0 / self.cfg.optim.accum_steps)
        return loss.detach()

    def evaluate(self) -> tuple[dict, dict | None]:
        bs, workers = self.cfg.data.batch_size, self.cfg.data.num_workers
        module = self.backend.module
        was = module.training
        module.eval()
        if self.sharded:
            _broadcast_buffers(module)
        metrics = evaluate(module, self.job.eval_set, self.backend, bs, workers)
        module.train(was)
        ema = None
        if self.ema is not None:
            ema = evaluate(self.ema.module.eval(), self.job.eval_set, self.backend, bs, workers)
        return metrics, ema

    def fit(self, logger: RunLogger, preemption: PreemptionHandler) -> FitResult:
        cfg, accum = self.cfg, self.cfg.optim.accum_steps
        metrics = ema_metrics = None
        window, tick, window_images, wait = [], time.perf_counter(), 0, DataWait()
        self.model.train()
        while self.step < self.total:
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            batches = iter(self._loader(epoch, in_epoch * accum))
            for _ in range(in_epoch, self.steps_per_epoch):
                lr = cosine_lr(self.step, self.lr, self.total, self.warmup, cfg.optim.min_lr)
                self.backend.set_lr(lr)
                loss = sum(self._micro(*wait.next(batches), sync=m == accum - 1) for m in range(accum)) / accum
                grad_norm = float(self.backend.step(cfg.optim.clip_grad))
                finite = math.isfinite(grad_norm)
                if finite and self.ema is not None:
                    self.ema.update(self.backend.module, step=self.step)
                self.step += 1
                wait.step()
                self.guard.record(self.step, finite)
                self.guard.check()  # this loop reads the norm every step anyway: stop at once
                if finite:
                    window.append(loss)
                window_images += cfg.data.batch_size * accum * self.env.world_size
                if self.step % cfg.output.log_every == 0 or self.step == self.total:
                    mean = torch.stack(window).mean() if window else torch.tensor(float("nan"))
                    if self.env.world_size > 1:
                        dist.all_reduce(mean)
                        mean = mean / self.env.world_size
                    elapsed = max(time.perf_counter() - tick, 1e-9)
                    logger.log(self.step, {"epoch": self.step / self.steps_per_epoch, "loss": float(mean),
                                           "lr": lr,
                                           "grad_norm": grad_norm if finite else None,
                                           "images_per_s": window_images / elapsed,
                                           "data_wait_ms": wait.flush_ms(),
                                           "skipped_steps": self.guard.skipped})
                    window, tick, window_images = [], time.perf_counter(), 0
                else:
                    logger.advance(self.step)
                if self.backend.any_rank(preemption.requested) and self.step < self.total:
                    path = self.save()
                    logger.print(f"{preemption.received or 'a signal on another rank'}: checkpoint of step "
                                 f"{self.step} written to {path}; continue with resume=auto")
                    return FitResult({}, None, self.step, self.step / self.steps_per_epoch, path,
                                     preemption.received or "signal", self.history)
                if self.step == self.total:
                    break
            done = epoch + 1
            last = self.step == self.total
            if done % cfg.eval.every == 0 or last:
                metrics, ema_metrics = self.evaluate()
                record = {"epoch": self.step / self.steps_per_epoch, "step": self.step, **_prefixed("eval", metrics)}
                if ema_metrics is not None:
                    record.update(_prefixed("eval_ema", ema_metrics))
                self.history.append(record)
                logger.log(self.step, {k: v for k, v in record.items() if k != "step"})
                logger.print(f"epoch {record['epoch']:.4g}: top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f}"
                             + (f" (EMA: top-1 {ema_metrics['top1']:.2f})" if ema_metrics else ""))
            if done % cfg.output.checkpoint_every == 0 or last:
                self.save()
        if metrics is None:  # resumed after the last step: evaluate what was trained
            metrics, ema_metrics = self.evaluate()
        return FitResult(metrics, ema_metrics, self.step, self.step / self.steps_per_epoch,
                         self.checkpoints.latest(), None, self.history)


def _wrap(backend: Backend, model: nn.Module) -> nn.Module:
    """FSDP shards each transformer block as its own unit (timm's blocks, named here)."""
    if backend.name == "fsdp":
        return backend.wrap(model, units=[m for m in model.modules() if isinstance(m, Block)])
    return backend.wrap(model)


def full_weights(backend: Backend) -> dict:
    """The whole state dict of a sharded model on the main rank, in CPU memory (empty on the
    others). Collective."""
    if backend.name != "deepspeed":
        return get_model_state_dict(backend.module,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    with _gathered(backend):
        if not backend.env.is_main:
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in backend.module.state_dict().items()}


def _gathered(backend: Backend):
    """ZeRO-3 keeps each rank's partition of a parameter only; inside this context every rank has
    them whole (read-only). Stages 1 and 2 keep whole parameters on every rank already."""
    if backend.zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(backend.module.parameters()), modifier_rank=None)


def _broadcast_buffers(module: nn.Module) -> None:
    """The main rank's buffers (BatchNorm statistics) on every rank, as DDP keeps them: sharding
    leaves buffers to each rank, so statistics drift apart with the ranks' batches."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def fit(job: Job, cfg, backend: Backend) -> FitResult:
    """Train ``job`` for ``cfg.schedule`` (resuming as ``cfg.resume`` says) and evaluate it."""
    trainer = _Trainer(job, cfg, backend)
    resume_from = resolve_resume(cfg.resume, trainer.checkpoints)
    if resume_from is not None:
        trainer.restore(resume_from)
    run_dir, env = trainer.run_dir, backend.env
    logger = RunLogger(run_dir, env.is_main, trainer.total, trainer.step, cfg.output.tensorboard,
                       cfg.output.progress)
    o = cfg.optim
    logger.print(
        f"mimscale {job.protocol}: {len(job.train_set)} training / {len(job.eval_set)} evaluation samples, "
        f"ranks={env.world_size} batch/rank={cfg.data.batch_size} accum={o.accum_steps} "
        f"effective_batch={trainer.effective_batch} lr={trainer.lr:.3g} "
        f"({'optim.lr' if o.lr else f'blr {o.blr:g} x {trainer.effective_batch}/256'}) "
        f"steps={trainer.total} ({trainer.steps_per_epoch}/epoch, warmup {trainer.warmup})"
        + (f", resumed at step {trainer.step} from {resume_from}" if resume_from else ""))
    try:
        with PreemptionHandler(PREEMPT_SIGNALS) as preemption:
            return trainer.fit(logger, preemption)
    finally:
        logger.close()
