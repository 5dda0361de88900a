"""Contrastive objectives: CAMAE's two-view InfoNCE (SPEC §2, MoCo v3) and ccMIM's
visible-vs-masked contrast (SPEC §4, eq. 7–8), computed in float32 with negatives from the global
batch. Gathers keep the local gradient, so each rank's loss backpropagates into its own samples.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated along dim 0; this rank's slice is ``x`` itself (with grad)."""
    rank, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)


def _labels(batch: int, device) -> torch.Tensor:
    rank, _ = _world()
    return torch.arange(batch, device=device) + rank * batch


class MLPHead(nn.Module):
    """``layers`` bias-free Linear layers with BN+ReLU between; optional BN (no affine) on the output.

    CAMAE's projector is 3 layers (4096 hidden, 256 out, output BN); its predictor 2 layers without
    output BN (MoCo v3). ccMIM's projector is 2 layers, D hidden, output BN [C].
    """

    def __init__(self, in_dim: int, hidden: int, out: int, layers: int, out_bn: bool):
        super().__init__()
        mods: list[nn.Module] = []
        dims = [in_dim] + [hidden] * (layers - 1) + [out]
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1], bias=False))
            if i < layers - 1:
                mods += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        if out_bn:
            mods.append(nn.BatchNorm1d(out, affine=False))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())


def infonce(q: torch.Tensor, k: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    """MoCo v3's ``2τ·CE(q·kᵀ/τ)`` with keys gathered from the global batch (keys carry no grad)."""
    q = F.normalize(q.float(), dim=-1)
    k = F.normalize(k.float(), dim=-1)
    keys = gather_with_grad(k.detach())
    logits = q @ keys.t() / tau
    return 2 * tau * F.cross_entropy(logits, _labels(q.shape[0], q.device))


def ccmim_nce(h_v: torch.Tensor, h_m: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """ccMIM eq. 7: positive (sg(hᴹᵢ), hⱽᵢ); negatives hⱽᵢ·hⱽⱼ (j ≠ i) and sg(hᴹᵢ)·hⱽⱼ over the global batch."""
    v = F.normalize(h_v.float(), dim=-1)
    m = F.normalize(h_m.float(), dim=-1).detach()
    v_all = gather_with_grad(v)
    labels = _labels(v.shape[0], v.device)
    vv = v @ v_all.t() / tau
    vv = vv.scatter(1, labels[:, None], float("-inf"))  # j ≠ i
    mv = m @ v_all.t() / tau
    positive = mv.gather(1, labels[:, None]).squeeze(1)
    return (torch.logsumexp(torch.cat([vv, mv], dim=1), dim=1) - positive).mean()


def ccmim_code(h_v: torch.Tensor, h_m: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """ccMIM's code: ``2τ·CE(hⱽ·sg(gather(hᴹ))ᵀ/τ)``."""
    v = F.normalize(h_v.float(), dim=-1)
    m_all = gather_with_grad(F.normalize(h_m.float(), dim=-1).detach())
    return 2 * tau * F.cross_entropy(v @ m_all.t() / tau, _labels(v.shape[0], v.device))


def ccmim_align(pred_v: torch.Tensor, h_m: torch.Tensor) -> torch.Tensor:
    """ccMIM eq. 8: ``1 − cos(sg(hᴹ), pred(hⱽ))``."""
    return (1 - F.cosine_similarity(pred_v.float(), h_m.float().detach(), dim=-1)).mean()
