"""Teachers: the networks whose no-grad attention guides masking (SPEC §7).

The EMA update is one fused ``lerp`` over parameter lists. Under FSDP2 / ZeRO-3 the teacher is
sharded exactly like the student, so both lists hold local shards of the same layout and the update
needs no gather.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from mimscale.errors import CheckpointError
from mimscale.pretrain.models.vit import patch_positions


def ema_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Cosine ramp of the EMA momentum from ``base`` at step 0 to ``final`` at ``total_steps``."""
    progress = min(1.0, step / max(1, total_steps))
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update_(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float,
                applied: torch.Tensor | None = None) -> None:
    """In place: ``θ_t ← m·θ_t + (1−m)·θ_s`` for every pair, as one fused foreach lerp.

    ``applied`` (a bool tensor: did the optimizer step run?) gates the update on the device, with
    no host sync: the weight ``(1−m)·applied`` is 0 after a skipped step, so the teacher stays
    bit-identical. A tensor weight takes three foreach ops and a transient copy of the teacher."""
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors, student {len(student)}")
    if not teacher:
        return
    if applied is None:
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)
        return
    delta = torch._foreach_sub(student, teacher)
    torch._foreach_mul_(delta, applied.to(teacher[0].device, torch.float32) * (1.0 - momentum))
    torch._foreach_add_(teacher, delta)


class TeacherEncoder(nn.Module):
    """The encoder parts a scorer needs (timm / MAE names), truncated after the scoring block.

    Never trained by the optimizer (``requires_grad=False``), never exported with the student.
    """

    def __init__(self, patch_embed: nn.Module, cls_token: torch.Tensor, pos_embed: torch.Tensor,
                 blocks: list[nn.Module], norm: nn.Module | None = None, full_depth: int | None = None):
        super().__init__()
        # the depth of the network the blocks were cut from: block -1 means its last block, which
        # a teacher truncated after block 9 of 12 does not hold (see ``scoring.resolve_block``)
        self.full_depth = len(blocks) if full_depth is None else full_depth
        self.patch_embed = patch_embed
        self.cls_token = nn.Parameter(cls_token.detach().clone(), requires_grad=False)
        self.pos_embed = nn.Parameter(pos_embed.detach().clone(), requires_grad=False)
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm  # only a full-depth teacher (a momentum encoder) keeps the final norm
        self.requires_grad_(False)

    @classmethod
    def from_student(cls, student: nn.Module, depth: int) -> TeacherEncoder:
        """A copy of the student's first ``depth`` blocks and embeddings (the EMA starting point)."""
        norm = copy.deepcopy(student.norm) if depth == len(student.blocks) else None
        return cls(copy.deepcopy(student.patch_embed), student.cls_token, student.pos_embed,
                   [copy.deepcopy(b) for b in student.blocks[:depth]], norm, len(student.blocks))

    def cls_output(self, images: torch.Tensor) -> torch.Tensor:
        """CLS after the final norm on the full image, ``[B, D]`` (the momentum branch of CAMAE)."""
        if self.norm is None:
            raise RuntimeError("this teacher was truncated for scoring; a momentum encoder needs every block")
        x = self.patch_embed(images) + patch_positions(self, images)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]

    def ema_pairs(self, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher tensors, the student tensors they follow), matched by name."""
        mine = dict(self.named_parameters())
        theirs = dict(student.named_parameters())
        names = [n for n in mine if n != "pos_embed"]  # fixed sin-cos table: identical, not averaged
        return [mine[n] for n in names], [theirs[n] for n in names]

    def train(self, mode: bool = True) -> TeacherEncoder:
        return super().train(False)  # always in eval mode (no drop path)


def frozen_teacher(path: str, model_name: str, img_size: int, patch_size: int | None,
                   depth: int | Callable[[int], int]) -> TeacherEncoder:
    """A teacher from any checkpoint ``resolve_checkpoint`` accepts (a mimscale run or checkpoint
    folder, an official MAE or timm file; encoder-only files included), truncated to ``depth``
    blocks (or to ``depth(its full depth)``: a teacher of another size than the student has its own)."""
    from mimscale.pretrain.models import build_mae, load_mae_checkpoint
    from mimscale.pretrain.models.export import read_state_dict

    overrides = {"img_size": img_size, "decoder_depth": 1}
    if patch_size is not None:
        overrides["patch_size"] = patch_size
    model = build_mae(model_name, **overrides)
    state = read_state_dict(path)
    encoder = {k: v for k, v in state.items() if k != "mask_token" and not k.startswith("decoder_")}
    try:
        load_mae_checkpoint(model, encoder)  # strict on every encoder key
    except CheckpointError as e:
        raise CheckpointError(f"teacher.checkpoint {path}: {e}; teacher.model names the teacher's size "
                              "when it differs from the student's") from e
    return TeacherEncoder.from_student(model, depth(len(model.blocks)) if callable(depth) else depth)
