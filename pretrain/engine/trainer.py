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
from mimscale.data_pipeline.build import build_pretrain_data
from mimscale.pretrain.masking import build_masking
from mimscale.pretrain.models import build_mae

from mimscale.config import Config, to_dict, to_yaml

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


def build_model(cfg: Config) -> torch.nn.Module:
    m = cfg.model
    overrides = {"img_size": m.img_size, "decoder_embed_dim": m.decoder_embed_dim, "decoder_depth": m.decoder_depth,
                     "decoder_num_heads": m.decoder_num_heads, "drop_path": m.drop_path,
                     "norm_pix_loss": cfg.objectives.norm_pix_loss}
    if m.patch_size is not None:
        overrides["patch_size"] = m.patch_size
    return build_mae(m.name, **overrides)


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
        self.model = self.backend.wrap(build_model(cfg))
        self.net = self.backend.module
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
            param_groups(self.net, cfg.optim.weight_decay), self.lr, cfg.optim.betas)
        self.masking = build_masking(cfg.masking)
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
        return {
            **self.backend.state_dict(),
            "step": self.step,
            "data": self.data.state_dict(),
            "masking": self.masking.state_dict(),
            "rng": self.backend.all_gather_object(rng_state()),
            "config": to_dict(self.cfg),
            "effective_batch": self.effective_batch,
            "lr": self.lr,
        }

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        self.backend.load_state_dict(state)
        self.step = int(state["step"])
        self.data.load_state_dict(state["data"])
        self.masking.load_state_dict(state["masking"])
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
        t0 = time.perf_counter()
        mask = self.masking(images, self.net.num_patches, generator)
        mask_time = time.perf_counter() - t0
        with self.backend.accumulate(sync):
            with self.backend.autocast():
                out = self.model(images, mask)
            loss = self.cfg.objectives.pixel_weight * out.loss
            (loss / self.cfg.optim.accum_steps).backward()
        return images, out, loss.detach(), mask_time

    def fit(self) -> RunSummary:
        cfg = self.cfg
        accum = cfg.optim.accum_steps
        data_iter = iter(self.data)
        losses: list[tuple[int, float]] = []
        window_loss, window_micro, window_images, window_mask_time = torch.zeros((), device=self.backend.device), 0, 0, 0.0
        window_start = start = time.perf_counter()
        last_ckpt = None
        out = images = None
        self.model.train()
        while self.step < self.total_steps:
            self.backend.set_lr(cosine_lr(self.step, self.lr, self.total_steps, self.warmup_steps, cfg.optim.min_lr))
            generator = step_generator(cfg.engine.seed, self.step, self.env.rank)
            epoch = self.data.state_dict()["epoch"]
            for micro in range(accum):
                images, out, loss, mask_time = self._micro_step(next(data_iter), generator, micro == accum - 1)
                window_loss += loss.float()  # stays on the device: no host sync per step
                window_micro += 1
                window_images += images.shape[0] * self.env.world_size
                window_mask_time += mask_time
            grad_norm = self.backend.step(cfg.optim.clip_grad)
            self.step += 1

            if self.step % cfg.logging.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                mean_loss = window_loss.item() / window_micro
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"non-finite loss {mean_loss} at step {self.step}")
                metrics = {"epoch": epoch, "loss": mean_loss, "lr": self.optimizer.param_groups[0]["lr"],
                           "grad_norm": float(grad_norm), "images_per_s": window_images / elapsed,
                           "mask_time_ms": 1000 * window_mask_time / window_micro}
                self.logger.log(self.step, metrics)
                losses.append((self.step, mean_loss))
                window_loss, window_micro, window_images, window_mask_time = torch.zeros((), device=self.backend.device), 0, 0, 0.0
                window_start = time.perf_counter()
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
        self.figures.append(reconstruction_grid(self.net, images, out.pred.detach(), out.mask, path))
