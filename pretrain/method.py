"""A pretraining method: the student MAE, its masking strategy, teacher and objectives, as one
module whose forward turns a batch into a loss. The trainer and the backends see only this module.

A recipe = strategy + teacher + objectives + defaults; this is where they meet. Everything except
the student (teachers, heads, strategy state such as PLB) is "method state": checkpointed next to
the student's official-MAE-layout weights, never mixed into them.
"""

from __future__ import annotations

import copy
import math
import time
from typing import NamedTuple

import torch
from torch import nn

from mimscale.config import score_source
from mimscale.pretrain.engine.backend import device_of, resolve_compile
from mimscale.pretrain.masking.multishot import ShotPlan
from mimscale.pretrain.masking.score_cache import CachedBatch
from mimscale.pretrain.masking.strategies import MaskingContext, MaskResult, build_strategy
from mimscale.pretrain.models import MAEOutput, build_mae
from mimscale.pretrain.objectives import (
    MAMDecoder,
    MAMHead,
    MLPHead,
    ccmim_align,
    ccmim_code,
    ccmim_nce,
    infonce,
    mam_loss,
    shot_weighted_pixel_loss,
)
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
    model = build_mae(m.name, **overrides)
    # per-block compile would recompile at every packed length; auto is resolved per device in encode
    compiled = resolve_compile(cfg.engine.compile, device_of(cfg.engine.device), cfg.engine.backend)
    model.varlen = "padded" if cfg.engine.varlen == "auto" and compiled else cfg.engine.varlen
    return model


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
        return frozen_teacher(t.checkpoint, t.model or cfg.model.name, cfg.model.img_size, cfg.model.patch_size,
                              lambda full: _teacher_depth(cfg, full))
    return None


class MIMMethod(nn.Module):
    # what ``engine.compile_scope=model`` compiles as one graph: the student's forward (masking
    # result in, loss out); teachers and heads are reached through other methods, block by block
    compile_whole = ("student",)

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
        self._build_heads(cfg.objectives, cfg.model)
        self.ema_teacher = cfg.teacher.type == "ema"
        self.momentum = (cfg.teacher.momentum, cfg.teacher.momentum_final)
        self.seed = cfg.engine.seed
        self.set_progress(0, 1, 1)

    def _build_heads(self, o, m) -> None:
        """The objectives' extra modules; absent when their weight is 0 (nothing unused in DDP)."""
        width = self.student.cls_token.shape[-1]
        self.mam = o.mam
        if o.mam.weight > 0:
            if o.mam.head == "linear":
                self.mam_head = MAMHead(m.decoder_embed_dim)
            else:
                self.mam_head = MAMDecoder(self.student, m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads)
        self.nce = o.infonce
        if o.infonce.weight > 0:
            self.projector = MLPHead(width, o.infonce.hidden, o.infonce.dim, 3, out_bn=True)
            self.predictor = MLPHead(o.infonce.dim, o.infonce.hidden, o.infonce.dim, 2, out_bn=False)
            self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.cc = o.ccmim
        if o.ccmim.weight > 0:
            self.cc_projector = MLPHead(width, width, o.ccmim.dim, 2, out_bn=True)
            if o.ccmim.variant == "align":
                self.cc_predictor = MLPHead(o.ccmim.dim, width, o.ccmim.dim, 2, out_bn=False)

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

    @property
    def score_network(self) -> nn.Module:
        return self.teacher if self._source_name == "teacher" else self.student

    @torch.no_grad()
    def make_mask(self, images: torch.Tensor, generator: torch.Generator,
                  cached: CachedBatch | None = None) -> MaskResult:
        """The strategy's input mask for a batch (and the score behind it), without training anything.
        ``cached``: the batch's maps from the score cache, warped here into the view."""
        shared = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)  # same on every rank
        grid = tuple(self.student.patch_embed.grid_for(images))
        ctx = MaskingContext(images, grid, self.score_network, self.epoch, self._progress_epoch(),
                             self.step / max(1, self.total_steps), generator, shared,
                             cached.warp(grid) if cached is not None else None)
        return self.strategy(ctx)

    @torch.no_grad()
    def score_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The strategy's score maps of full images, ``[B, C, gh, gw]`` (the score cache's refresh pass)."""
        maps = self.strategy.score_maps(self.score_network, images)
        return maps.unflatten(-1, tuple(self.student.patch_embed.grid_for(images)))

    # ------------------------------------------------------------------ step

    def forward(self, images: torch.Tensor, generator: torch.Generator,
                views: torch.Tensor | None = None, cached: CachedBatch | None = None) -> StepOutput:
        """One batch -> the total loss. ``images`` is the (first) view the student reconstructs;
        ``views`` the second view of two-view recipes (CAMAE); ``cached`` its score-cache maps."""
        t0 = time.perf_counter()
        masked = self.make_mask(images, generator, cached)
        mask_time = torch.tensor(1000 * (time.perf_counter() - t0))
        out = self.student(images, masked.mask, self.plan, generator, masked.visible)
        self.strategy.observe(out.loss_per_image)
        pixel, shot_means = shot_weighted_pixel_loss(out.loss_per_patch, out.shot_masks, self.loss_weights,
                                                     self.shot_ratios)
        loss = self.pixel_weight * pixel
        terms = {"loss_pixel": pixel.detach(), "mask_time_ms": mask_time}
        if len(shot_means) > 1:
            terms.update({f"loss_shot{i + 1}": v.detach() for i, v in enumerate(shot_means)})
        for name, weight, term in self._extra_terms(images, views, masked, out):
            loss = loss + weight * term
            terms[f"loss_{name}"] = term.detach()
        terms.update({k: torch.as_tensor(v) for k, v in (masked.logs or {}).items()})
        return StepOutput(loss, terms, out)

    def _extra_terms(self, images, views, masked: MaskResult, out: MAEOutput):
        """(name, weight, loss) of every objective beyond pixels that this recipe switches on."""
        if self.mam.weight > 0:
            if isinstance(self.mam_head, MAMHead):
                yield "mam", self.mam.weight, mam_loss(self.mam_head(out.decoder_features), masked.score, out.mask)
            else:  # the code's second decoder: all patches, only late in training (0 x before: no unused params)
                on = float(self.step >= self.mam.start * self.total_steps)
                yield "mam", self.mam.weight * on, mam_loss(self.mam_head(out.latent, out.mask), masked.score)
        if self.nce.weight > 0:
            if views is None:
                raise ValueError("objectives.infonce needs a second view per image: set data.views=mocov3")
            q1, q2 = (self.predictor(self.projector(self._student_cls(v))) for v in (images, views))
            with torch.no_grad():
                k1, k2 = (self.momentum_projector(self.teacher.cls_output(v)) for v in (images, views))
            yield "contrast", self.nce.weight, infonce(q1, k2, self.nce.tau) + infonce(q2, k1, self.nce.tau)
        if self.cc.weight > 0:
            h_v = self.cc_projector(out.latent[:, 0])
            with torch.no_grad():  # the masked set through the encoder, without gradient
                shown = None if masked.visible is None else masked.mask.shape[1] - masked.visible
                h_m = self.cc_projector(self.student.encode(images, ~masked.mask, visible=shown).latent[:, 0])
            if self.cc.variant == "nce":
                term = ccmim_nce(h_v, h_m, self.cc.tau)
            elif self.cc.variant == "code":
                term = ccmim_code(h_v, h_m, self.cc.tau)
            else:
                term = ccmim_align(self.cc_predictor(h_v), h_m)
            yield "contrast", self.cc.weight, term

    def _student_cls(self, images: torch.Tensor) -> torch.Tensor:
        """The student encoder's CLS after the final norm on the full image, with gradient."""
        n = math.prod(self.student.patch_embed.grid_for(images))
        visible = torch.zeros(images.shape[0], n, dtype=torch.bool, device=images.device)
        return self.student.forward_encoder(images, visible)[:, 0]

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int, applied: torch.Tensor | None = None) -> None:
        """EMA teacher update after each optimizer step (a frozen teacher never changes).
        ``applied``: the step's bool on the device; after a skipped step the teacher must not
        follow, which is decided there (no host sync)."""
        if not self.ema_teacher:
            return
        m = ema_momentum(step, total_steps, *self.momentum)
        ema_update_(*self.teacher.ema_pairs(self.student), m, applied)
        if self.nce.weight > 0:
            ema_update_(list(self.momentum_projector.parameters()), list(self.projector.parameters()), m, applied)

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

