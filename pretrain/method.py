"""A pretraining method: the student MAE, its masking strategy and its objectives, as one module
whose forward turns a batch into a loss. The trainer and the backends see only this module.

A recipe = strategy + teacher + objectives + defaults; this is where they meet. Everything except
the student (teachers, heads, strategy state such as PLB) is "method state": checkpointed next to
the student's official-MAE-layout weights, never mixed into them.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
from torch import nn

from mimscale.pretrain.masking import build_masking
from mimscale.pretrain.models import MAEOutput, build_mae

STUDENT = "student."


class MaskResult(NamedTuple):
    mask: torch.Tensor                # [B, N] bool, True = hidden
    score: torch.Tensor | None        # [B, N] the score the selector ranked (None for random)


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


class MIMMethod(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.student = build_model(cfg)
        self.masking = build_masking(cfg.masking)
        self.pixel_weight = cfg.objectives.pixel_weight

    @torch.no_grad()
    def make_mask(self, images: torch.Tensor, generator: torch.Generator) -> MaskResult:
        """The strategy's mask for a batch (and the score behind it), without training anything."""
        return MaskResult(self.masking(images, self.student.num_patches, generator), None)

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> StepOutput:
        t0 = time.perf_counter()
        mask = self.make_mask(images, generator).mask
        mask_time = torch.tensor(time.perf_counter() - t0)
        out = self.student(images, mask)
        loss = self.pixel_weight * out.loss
        return StepOutput(loss, {"loss_pixel": out.loss.detach(), "mask_time_ms": 1000 * mask_time}, out)

    def set_progress(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Where training stands, for schedules inside the method (soft-to-hard, PLB epochs)."""
        self.step, self.total_steps, self.steps_per_epoch = step, total_steps, steps_per_epoch

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Hook for state that follows the student (an EMA teacher); nothing for plain MAE."""

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
