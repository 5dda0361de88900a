"""The pretraining loop. It builds the pieces from the config and calls them; it never asks which
backend, strategy or data source it has.

One step: for each micro-batch, mask -> forward (autocast) -> backward (gradient sync only on the
last micro-batch); then clip, optimizer step, lr for the next step. Every ``checkpoint_every``
steps, and at the end, an atomic checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mimscale.config import Config, to_dict, to_yaml
from mimscale.data_pipeline.build import build_pretrain_data
from mimscale.pretrain.method import MIMMethod

from .backend import build_backend, init_distributed
from .checkpoint import CheckpointManager, load_checkpoint, resolve_resume
from .figures import reconstruction_grid
from .logger import RunLogger
from .optim import param_groups
from .rng import rng_state, seed_everything, set_rng_state, step_generator
from .schedule import cosine_lr, scaled_lr


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    checkpoint: Path | None
    metrics: Path
    tensorboard: Path | None
    figures: list[Path]
    losses: list[tuple[int, float]]
    wall_time: float


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        if cfg.engine.threads:
            torch.set_num_threads(cfg.engine.threads)
        device_type = "cuda" if cfg.engine.device == "cuda" or (
            cfg.engine.device == "auto" and torch.cuda.is_available()) else "cpu"
        self.env = init_distributed(device_type)
        self.backend = build_backend(cfg.engine, self.env)
        self.run_dir = Path(cfg.output.dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        seed_everything(cfg.engine.seed)  # identical initial weights on every rank
        self.model = self.backend.wrap(MIMMethod(cfg))
        self.method: MIMMethod = self.backend.module
        self.data = build_pretrain_data(cfg.data, cfg.model.img_size, cfg.engine.seed,
                                        self.env.rank, self.env.world_size)
        seed_everything(cfg.engine.seed + self.env.rank)  # per-rank stream for drop path etc.

        accum = cfg.optim.accum_steps
        self.steps_per_epoch = max(1, self.data.steps_per_epoch // accum)
        self.total_steps = cfg.schedule.max_steps or cfg.schedule.epochs * self.steps_per_epoch
        self.warmup_steps = (cfg.schedule.warmup_steps if cfg.schedule.warmup_steps is not None
                             else round(cfg.schedule.warmup_epochs * self.steps_per_epoch))
        self.effective_batch = cfg.data.batch_size * accum * self.env.world_size
        self.lr = cfg.optim.lr or scaled_lr(cfg.optim.blr, self.effective_batch)
        self.optimizer = self.backend.build_optimizer(
            param_groups(self.method, cfg.optim.weight_decay), self.lr, cfg.optim.betas)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.output.keep_last)
        self.step = 0
        self.figures: list[Path] = []

        resume_from = resolve_resume(cfg.resume, self.checkpoints)
        if resume_from is not None:
            self._restore(resume_from)
        if self.env.is_main:
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.logger = RunLogger(self.run_dir, self.env.is_main, self.total_steps, self.step,
                                cfg.logging.tensorboard, cfg.logging.progress)
        self.logger.print(
            f"mimscale pretrain: recipe={cfg.recipe} model={cfg.model.name} img={cfg.model.img_size} "
            f"ranks={self.env.world_size} batch/rank={cfg.data.batch_size} accum={accum} "
            f"effective_batch={self.effective_batch} lr={self.lr:.3g} "
            f"({'optim.lr' if cfg.optim.lr else f'blr {cfg.optim.blr:g} x {self.effective_batch}/256'}) "
            f"steps={self.total_steps} ({self.steps_per_epoch}/epoch, warmup {self.warmup_steps})"
            + (f" resumed at step {self.step} from {resume_from}" if resume_from else ""))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        backend_state = self.backend.state_dict()
        student, method_state = self.method.split_state_dict(backend_state.pop("model"))
        return {
            "model": student,  # official MAE layout: loads into build_mae(...) and exports to timm
            "method": method_state,
            **backend_state,
            "step": self.step,
            "data": self.data.state_dict(),
            "rng": self.backend.all_gather_object(rng_state()),
            "config": to_dict(self.cfg),
            "effective_batch": self.effective_batch,
            "lr": self.lr,
        }

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        model = self.method.join_state_dict(state["model"], state.get("method", {}))
        self.backend.load_state_dict({**state, "model": model})
        self.step = int(state["step"])
        self.data.load_state_dict(state["data"])
        rngs = state["rng"]
        if len(rngs) == self.env.world_size:
            set_rng_state(rngs[self.env.rank])

    def save_checkpoint(self) -> Path | None:
        state = self.state_dict()  # collective: every rank takes part
        path = None
        if self.env.is_main:
            path = self.checkpoints.save(self.step, state, to_yaml(self.cfg))
        self.backend.barrier()
        return path

    # ------------------------------------------------------------------ loop

    def _micro_step(self, batch: dict, generator: torch.Generator, sync: bool):
        images = batch["images"].to(self.backend.device, non_blocking=True)
        with self.backend.accumulate(sync):
            with self.backend.autocast():
                out = self.model(images, generator)
            (out.loss / self.cfg.optim.accum_steps).backward()
        return images, out

    def fit(self) -> RunSummary:
        cfg = self.cfg
        accum = cfg.optim.accum_steps
        data_iter = iter(self.data)
        losses: list[tuple[int, float]] = []
        window = _Window()
        start = time.perf_counter()
        last_ckpt = None
        out = images = None
        self.model.train()
        while self.step < self.total_steps:
            self.backend.set_lr(cosine_lr(self.step, self.lr, self.total_steps, self.warmup_steps, cfg.optim.min_lr))
            generator = step_generator(cfg.engine.seed, self.step, self.env.rank)
            self.method.set_progress(self.step, self.total_steps, self.steps_per_epoch)
            epoch = self.data.state_dict()["epoch"]
            for micro in range(accum):
                images, out = self._micro_step(next(data_iter), generator, micro == accum - 1)
                window.add({"loss": out.loss.detach(), **out.terms}, images.shape[0] * self.env.world_size)
            grad_norm = self.backend.step(cfg.optim.clip_grad)
            self.method.after_optimizer_step(self.step, self.total_steps)
            self.step += 1

            if self.step % cfg.logging.log_every == 0 or self.step == self.total_steps:
                means, images_per_s = window.flush()
                if not math.isfinite(means["loss"]):
                    raise FloatingPointError(f"non-finite loss {means['loss']} at step {self.step}")
                metrics = {"epoch": epoch, **means, "lr": self.optimizer.param_groups[0]["lr"],
                           "grad_norm": float(grad_norm), "images_per_s": images_per_s}
                self.logger.log(self.step, metrics)
                losses.append((self.step, means["loss"]))
            else:
                self.logger.advance(self.step)
            if cfg.logging.image_every and self.step % cfg.logging.image_every == 0 and self.env.is_main:
                self._figure(images, out)
            if self.step % cfg.output.checkpoint_every == 0 or self.step == self.total_steps:
                last_ckpt = self.save_checkpoint()
        if self.env.is_main and out is not None and (
                not cfg.logging.image_every or self.step % cfg.logging.image_every):
            self._figure(images, out)
        self.logger.close()
        return RunSummary(self.run_dir, self.step, last_ckpt or self.checkpoints.latest(), self.logger.metrics_path,
                          self.logger.tb_dir if cfg.logging.tensorboard else None, self.figures, losses,
                          time.perf_counter() - start)

    def _figure(self, images: torch.Tensor, out) -> None:
        path = self.run_dir / "figures" / f"recon_step_{self.step:08d}.png"
        mae = out.mae
        self.figures.append(reconstruction_grid(self.method.student, images, mae.pred.detach(), mae.mask, path))


class _Window:
    """Sums logged terms between two log lines on the device; one host sync when flushed."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.images = 0
        self.start = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], images: int) -> None:
        for k, v in terms.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1
        self.images += images

    def flush(self) -> tuple[dict[str, float], float]:
        keys = list(self.sums)
        values = torch.stack([self.sums[k].to(self.sums[keys[0]].device) for k in keys]).cpu().tolist()
        means = {k: v / self.count for k, v in zip(keys, values)}
        rate = self.images / max(1e-9, time.perf_counter() - self.start)
        self.__init__()
        return means, rate
