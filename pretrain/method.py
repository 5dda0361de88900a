"""A pretraining method: the student MAE, its masking strategy, teacher and objectives, as one
module whose forward turns a batch into a loss. The trainer and the backends see only this module.

A recipe = strategy + teacher + objectives + defaults; this is where they meet. Everything except
the student (teachers, heads, strategy state such as PLB) is "method state": checkpointed next to
the student's official-MAE-layout weights, never mixed into them.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from mimscale.config import score_source
from mimscale.pretrain.masking.multishot import ShotPlan
from mimscale.pretrain.masking.strategies import MaskingContext, MaskResult, build_strategy
from mimscale.pretrain.models import MAEOutput, build_mae
from mimscale.pretrain.teacher import TeacherEncoder, ema_momentum, ema_update_, frozen_teacher

STUDENT = "student."

__all__ = ["MIMMethod", "MaskResult", "StepOutput", "build_model"]


class StepOutput(NamedTuple):
    loss: torch.Tensor                # the total loss to backpropagate
    terms: dict[str, torch.Tensor]    # detached scalars to log (each loss term, mask time, ...)
    mae: MAEOutput                    # the student's reconstruction, for figures


def build_model(cfg) -> nn.Module:
    """The student MAE of a config (``model`` section, norm-pix from ``objectives``)."""
    m = cfg.model
    overrides = dict(img_size=m.img_size, decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
                     decoder_num_heads=m.decoder_num_heads, drop_path=m.drop_path,
                     norm_pix_loss=cfg.objectives.norm_pix_loss)
    if m.patch_size is not None:
        overrides["patch_size"] = m.patch_size
    return build_mae(m.name, **overrides)


def _teacher_depth(cfg, depth: int) -> int:
    """Blocks a teacher must keep: up to the block that produces the strategy's score (all of
    them when it is not the scorer, e.g. a momentum encoder for a contrastive loss)."""
    m = cfg.masking
    if score_source(m) == "teacher":
        if m.strategy == "gpa":
            return m.gpa.block % depth + 1
        if m.strategy in ("sbam", "sbam_amr"):
            return 0  # salience reads the input embeddings only
    return depth


def build_teacher(cfg, student: nn.Module) -> TeacherEncoder | None:
    t = cfg.teacher
    depth = _teacher_depth(cfg, len(student.blocks))
    if t.type == "ema":
        return TeacherEncoder.from_student(student, depth)
    if t.type == "frozen":
        return frozen_teacher(t.checkpoint, t.model or cfg.model.name, cfg.model.img_size, cfg.model.patch_size, depth)
    return None


class MIMMethod(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.student = build_model(cfg)
        self.teacher = build_teacher(cfg, self.student)
        source = score_source(cfg.masking)
        self._source_name = "teacher" if source == "teacher" else "student"
        heads = self.student.blocks[0].attn.num_heads
        if source == "teacher" and len(self.teacher.blocks):
            heads = self.teacher.blocks[0].attn.num_heads
        self.strategy = build_strategy(cfg.masking, heads)
        self.plan = ShotPlan(cfg.masking.shots, len(self.student.blocks)) if cfg.masking.shots else None
        self.loss_weights = cfg.masking.loss_weights
        self.shot_ratios = [cfg.masking.ratio] + (self.plan.ratios if self.plan else [])
        self.pixel_weight = cfg.objectives.pixel_weight
        self.ema_teacher = cfg.teacher.type == "ema"
        self.momentum = (cfg.teacher.momentum, cfg.teacher.momentum_final)
        self.seed = cfg.engine.seed
        self.set_progress(0, 1, 1)

    # ------------------------------------------------------------------ schedule

    def set_progress(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Where training stands, for schedules inside the method (soft-to-hard, PLB epochs)."""
        self.step, self.total_steps, self.steps_per_epoch = step, total_steps, steps_per_epoch

    @property
    def epoch(self) -> int:
        return self.step // max(1, self.steps_per_epoch)

    def _progress_epoch(self) -> float:
        """GPA's "for each epoch t = 1, …, T": t/T with t the 1-based epoch being trained."""
        epochs = max(1.0, self.total_steps / max(1, self.steps_per_epoch))
        return min(1.0, (self.epoch + 1) / epochs)

    # ------------------------------------------------------------------ masking

    @torch.no_grad()
    def make_mask(self, images: torch.Tensor, generator: torch.Generator) -> MaskResult:
        """The strategy's input mask for a batch (and the score behind it), without training anything."""
        shared = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)  # same on every rank
        source = self.teacher if self._source_name == "teacher" else self.student
        ctx = MaskingContext(images, tuple(self.student.grid_size), source, self.epoch, self._progress_epoch(),
                             self.step / max(1, self.total_steps), generator, shared)
        return self.strategy(ctx)

    # ------------------------------------------------------------------ step

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> StepOutput:
        t0 = time.perf_counter()
        masked = self.make_mask(images, generator)
        mask_time = torch.tensor(1000 * (time.perf_counter() - t0))
        out = self.student(images, masked.mask, self.plan, generator)
        self.strategy.observe(out.loss_per_image)
        pixel, shot_terms = self.pixel_objective(out)
        terms = {"loss_pixel": pixel.detach(), **shot_terms, "mask_time_ms": mask_time,
                 **{k: torch.as_tensor(v) for k, v in (masked.logs or {}).items()}}
        return StepOutput(self.pixel_weight * pixel, terms, out)

    def pixel_objective(self, out: MAEOutput) -> tuple[torch.Tensor, dict]:
        """MAE loss over every hidden patch, whichever shot hid it (SPEC §6 weights: union, equal,
        ratio). The mean's denominator is the global count, so ragged batches (AMR) weigh every
        hidden patch equally across ranks."""
        per_patch = out.loss_per_patch
        means = [(per_patch * m).sum() / _global_count(m) for m in out.shot_masks]
        terms = {f"loss_shot{i + 1}": v.detach() for i, v in enumerate(means)} if len(means) > 1 else {}
        if self.loss_weights == "union" or len(means) == 1:
            return (per_patch * out.mask).sum() / _global_count(out.mask), terms
        weights = [1 / len(means)] * len(means) if self.loss_weights == "equal" else self.shot_ratios
        return sum(w * v for w, v in zip(weights, means)), terms

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """EMA teacher update after each optimizer step (a frozen teacher never changes)."""
        if not self.ema_teacher:
            return
        m = ema_momentum(step, total_steps, *self.momentum)
        ema_update_(*self.teacher.ema_pairs(self.student), m)

    # ------------------------------------------------------------------ state

    def no_weight_decay(self) -> set[str]:
        return {STUDENT + n for n in self.student.no_weight_decay()}

    @staticmethod
    def split_state_dict(state: dict) -> tuple[dict, dict]:
        """(student weights in the official MAE layout, everything else)."""
        student = {k[len(STUDENT):]: v for k, v in state.items() if k.startswith(STUDENT)}
        rest = {k: v for k, v in state.items() if not k.startswith(STUDENT)}
        return student, rest

    @staticmethod
    def join_state_dict(student: dict, rest: dict) -> dict:
        return {**{STUDENT + k: v for k, v in student.items()}, **rest}


def _global_count(mask: torch.Tensor) -> torch.Tensor:
    """Hidden patches per rank on average over ranks: with DDP's gradient averaging, sum/this is
    the exact mean over the global batch even when ranks hide different counts."""
    count = mask.sum().float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = count.clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp_min(1.0)
