"""``mimscale analyze attention``: mean attention distance (pixels) and entropy per block and head.

Protocol (SPEC §6, after MAE-Lite): each block's attention ``softmax(q kᵀ/√d)`` from its own q, k on
its norm1 output, with the CLS row and column dropped and the rows re-softmaxed over the patches.
Distance: per query, the attention-weighted distance in pixels between patch centres. Entropy: per
query, ``−Σ a·ln(a + 1e-6)``. Both are averaged over queries and images. Local heads have small
distances; a collapsed head attends everywhere alike and has an entropy near ``ln N``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .encoders import Encoder, block_inputs
from .output import progress, pyplot, save_figure, write_csv

ENTROPY_EPS = 1e-6


def patch_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q, k [B, h, 1+N, d]`` -> patch-to-patch attention ``[B, h, N, N]``, rows summing to 1."""
    logits = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    return logits[..., 1:, 1:].softmax(dim=-1)


@functools.lru_cache(maxsize=8)
def patch_distances(grid: tuple[int, int], patch: int) -> torch.Tensor:
    """``[N, N]`` Euclidean distances in pixels between patch centres (row-major patches); cached,
    never modify it."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).float() * patch
    return torch.cdist(centres, centres)


def attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """``[..., N, N]`` -> ``[...]``: mean over queries of the attention-weighted distance (pixels)."""
    dist = patch_distances(grid, patch).to(attn.device)
    return (attn * dist).sum(-1).mean(-1)


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """``[..., N, N]`` -> ``[...]``: mean over queries of ``−Σ a·ln(a + 1e-6)`` (nats)."""
    return -(attn * (attn + ENTROPY_EPS).log()).sum(-1).mean(-1)


@torch.no_grad()
def attention_stats(model, images: torch.Tensor, batch_size: int = 16,
                    description: str = "attention") -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, entropy), each ``[blocks, heads]``, averaged over ``images``."""
    depth, heads = len(model.blocks), model.blocks[0].attn.num_heads
    dist_sum = torch.zeros(depth, heads, dtype=torch.float64)
    ent_sum = torch.zeros(depth, heads, dtype=torch.float64)
    device = next(model.parameters()).device
    starts = range(0, images.shape[0], batch_size)
    for start in progress(starts, len(starts), description):
        batch = images[start:start + batch_size].to(device)
        for j, (blk, x) in enumerate(zip(model.blocks, block_inputs(model, batch))):
            attn = patch_attention(*blk.attn.qk(blk.norm1(x)))
            dist_sum[j] += attention_distance(attn, model.grid_size, model.patch_size).sum(0).double().cpu()
            ent_sum[j] += attention_entropy(attn).sum(0).double().cpu()
    n = images.shape[0]
    return (dist_sum / n).float(), (ent_sum / n).float()


def run(encoders: list[Encoder], source, out: Path, batch_size: int, device: str) -> tuple[Path, Path]:
    rows, stats = [], {}
    for enc in encoders:
        model = enc.model.to(device)
        dist, ent = attention_stats(model, source.at(model.patch_embed.img_size[0]), batch_size, enc.label)
        stats[enc.label] = (dist, ent)
        for b in range(dist.shape[0]):
            rows += [(enc.label, b, h, float(dist[b, h]), float(ent[b, h])) for h in range(dist.shape[1])]
    csv = write_csv(out / "attention.csv", ("checkpoint", "block", "head", "distance_px", "entropy"), rows)
    return csv, save_figure(_figure(stats), out / "attention.png")


def _figure(stats: dict):
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = plt.get_cmap("tab10")
    n = len(stats)
    for i, (label, values) in enumerate(stats.items()):
        shift = 0.5 * (i - (n - 1) / 2) / max(1, n)  # side by side within a block
        for ax, v in zip(axes, values):
            blocks = torch.arange(v.shape[0]).float()
            xs = (blocks[:, None] + shift).expand_as(v)
            ax.scatter(xs.flatten(), v.flatten(), s=14, color=colours(i % 10), alpha=0.8,
                       label=label, edgecolors="none")
            ax.plot(blocks + shift, v.mean(1), color=colours(i % 10), lw=0.8, alpha=0.5)
    for ax, title, unit in zip(axes, ("mean attention distance", "attention entropy"), ("pixels", "nats")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("block")
        ax.set_ylabel(unit)
        ax.set_title(f"{title} (one dot per head)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig
