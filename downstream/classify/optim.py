"""Optimisers of the classification protocols: layer-wise lr decay for fine-tuning, LARS for the
linear probe.

Layer decay (BEiT / MAE fine-tuning): with L blocks, a parameter at depth ``i`` (0 = patch
embedding, position table and CLS token; ``k + 1`` = block ``k``; ``L + 1`` = final norm, pooled
norm and head) trains at ``lr · decay^(L + 1 − i)`` [C: MAE lr_decay.py]. (timm's own grouping puts
the final norm with the last block, one factor of ``decay`` below MAE's.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mimscale.downstream.dense.optim import layer_decay_param_groups


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Param groups with ``lr_scale`` (read by the backend's ``set_lr``) and ``weight_decay``;
    1-D parameters and the model's ``no_weight_decay()`` names (position table, CLS token) get no
    weight decay [C: MAE lr_decay.py]."""
    return layer_decay_param_groups(model, 1.0, weight_decay, layer_decay, len(model.blocks), backbone_prefix="")


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update of every weight matrix is rescaled to
    ``trust · ‖w‖ / ‖g + wd·w‖`` of the weight (You et al., 2017) — MAE's linear-probe optimiser.

    Biases and other 1-D parameters take plain momentum SGD, without weight decay or rescaling.
    The ratio is computed on the device (no host sync); a zero weight or update leaves it at 1.

    Under DeepSpeed ZeRO each rank steps a flat slice of every param group, so the norms of a
    weight must be summed over the ranks: a group holding one parameter can say ``adapt`` (it is a
    weight matrix) and ``numel`` (its whole size; the rank's slice is then the ``rank``-th of
    equal contiguous slices, padding past ``numel`` ignored).
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f"LARS: invalid lr {lr}, weight_decay {weight_decay}, momentum {momentum} "
                             f"or trust_coefficient {trust_coefficient}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if group.get("adapt", p.ndim > 1):
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = _norms(p, update, group.get("numel"))
                    trust = group["trust_coefficient"] * w_norm / u_norm
                    update = update * torch.where((w_norm > 0) & (u_norm > 0), trust, torch.ones_like(trust))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


def _norms(weight: torch.Tensor, update: torch.Tensor, numel: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 norms of a whole weight and its update, from this rank's slice if ``numel`` is given."""
    if numel is None:
        return torch.linalg.vector_norm(weight), torch.linalg.vector_norm(update)
    part = weight.numel()
    real = max(0, min(part, numel - dist.get_rank() * part))
    squares = torch.stack([weight.reshape(-1)[:real].square().sum(), update.reshape(-1)[:real].square().sum()])
    dist.all_reduce(squares)
    return squares[0].sqrt(), squares[1].sqrt()
