"""The transformer blocks of a method, and the per-block options every backend applies to them.

A method may hold blocks in several places (the student encoder and decoder, a teacher, heads), so
they are found by type rather than by attribute path. The order follows torchtitan's: activation
checkpointing, then ``torch.compile``, then sharding (done by the backend).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimscale.pretrain.models.vit import Block


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every ``vit.Block`` inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, Block)]


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def checkpoint_activations(blocks: list[nn.Module]) -> None:
    """Recompute each trainable block's activations in backward instead of storing them.

    The block's own ``forward`` is replaced (not the module), so parameter names, the state dict
    and sharding stay exactly as without checkpointing. No-grad passes (teachers) run unchanged.
    """
    for blk in blocks:
        if not _trains(blk) or getattr(blk, "_mimscale_checkpointed", False):
            continue
        forward = blk.forward

        @functools.wraps(forward)
        def run(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        blk.forward = run
        blk._mimscale_checkpointed = True


def compile_blocks(blocks: list[nn.Module], mode: str = "default") -> None:
    """``torch.compile`` each block in place (one small graph per block compiles fast and is
    reused by every block of the same shape), in torch.compile's ``mode`` (``engine.compile_mode``)."""
    for blk in blocks:
        blk.compile(mode=None if mode == "default" else mode)


def compile_whole(model: nn.Module, mode: str = "default") -> list[nn.Module]:
    """``torch.compile`` the parts of ``model`` that it names in ``compile_whole`` (attribute names;
    a method's student) as one graph each; returns them. Their blocks are then traced inside that
    graph, so they must not be compiled on their own as well."""
    parts = [getattr(model, name) for name in getattr(model, "compile_whole", ())]
    for part in parts:
        part.compile(mode=None if mode == "default" else mode)
    return parts


def prepare_blocks(model: nn.Module, activation_checkpointing: bool, compile: bool,
                   compile_mode: str = "default", compile_scope: str = "blocks") -> list[nn.Module]:
    """Activation checkpointing, then compile: each block (``compile_scope=blocks``), or the parts
    the model names whole and every block outside them (``model``)."""
    blocks = transformer_blocks(model)
    if activation_checkpointing:
        checkpoint_activations(blocks)
    if compile:
        whole = compile_whole(model, compile_mode) if compile_scope == "model" else []
        inside = {id(b) for part in whole for b in transformer_blocks(part)}
        compile_blocks([b for b in blocks if id(b) not in inside], compile_mode)
    return blocks
