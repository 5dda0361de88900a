"""``mimscale analyze cka``: minibatch linear CKA between every block of two encoders (SPEC §6).

Representations are the blocks' inputs (what norm1 reads), flattened over tokens. Following Nguyen
et al. (2021), HSIC is the unbiased estimator (Song et al. 2012) of each minibatch's linear Gram
matrices, averaged over minibatches, so memory stays ``O(batch²)`` whatever the number of images:

    CKA(X, Y) = mean HSIC₁(K, L) / sqrt(mean HSIC₁(K, K) · mean HSIC₁(L, L)),  K = X Xᵀ, L = Y Yᵀ
"""

from __future__ import annotations

from pathlib import Path

import torch

from .encoders import Encoder, block_inputs
from .output import AnalysisError, progress, pyplot, save_figure, write_csv


def gram(features: torch.Tensor) -> torch.Tensor:
    """``[n, ...]`` -> linear Gram matrix ``[n, n]`` in float64."""
    x = features.flatten(1).double()
    return x @ x.T


def unbiased_hsic(kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """HSIC₁ of every pair of Gram matrices: ``kx [P, n, n]``, ``ky [Q, n, n]`` -> ``[P, Q]`` (n ≥ 4).

    ``1/(n(n−3)) · [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1]`` with K̃, L̃ the Gram
    matrices with zeroed diagonals.
    """
    n = kx.shape[-1]
    if n < 4:
        raise AnalysisError(f"unbiased HSIC needs at least 4 samples per minibatch, got {n}")
    kx = kx - torch.diag_embed(torch.diagonal(kx, dim1=-2, dim2=-1))
    ky = ky - torch.diag_embed(torch.diagonal(ky, dim1=-2, dim2=-1))
    trace = torch.einsum("pab,qab->pq", kx, ky)  # symmetric Grams: tr(K̃L̃) = Σ K̃∘L̃
    rows_x, rows_y = kx.sum(-1), ky.sum(-1)     # K̃1, L̃1
    sums = rows_x.sum(-1)[:, None] * rows_y.sum(-1)[None, :]
    cross = rows_x @ rows_y.T                   # 1ᵀK̃L̃1
    return (trace + sums / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


class MinibatchCKA:
    """Accumulates HSIC₁ over minibatches for ``P × Q`` pairs of representations."""

    def __init__(self, p: int, q: int):
        self.xy = torch.zeros(p, q, dtype=torch.float64)
        self.xx = torch.zeros(p, dtype=torch.float64)
        self.yy = torch.zeros(q, dtype=torch.float64)
        self.batches = 0

    def update(self, grams_x: torch.Tensor, grams_y: torch.Tensor) -> None:
        """One minibatch: ``grams_x [P, n, n]``, ``grams_y [Q, n, n]`` over the same n samples."""
        self.xy += unbiased_hsic(grams_x, grams_y).cpu()
        self.xx += torch.diagonal(unbiased_hsic(grams_x, grams_x)).cpu()
        self.yy += torch.diagonal(unbiased_hsic(grams_y, grams_y)).cpu()
        self.batches += 1

    def value(self) -> torch.Tensor:
        """``[P, Q]`` CKA (the minibatch count cancels out of the ratio)."""
        if not self.batches:
            raise AnalysisError("no minibatch was accumulated")
        return self.xy / (self.xx[:, None] * self.yy[None, :]).sqrt()


@torch.no_grad()
def block_grams(model, images: torch.Tensor) -> torch.Tensor:
    """``[blocks, n, n]`` Gram matrices of every block's input."""
    return torch.stack([gram(x) for x in block_inputs(model, images)])


@torch.no_grad()
def layer_cka(model_x, images_x: torch.Tensor, model_y, images_y: torch.Tensor,
              batch_size: int = 32) -> torch.Tensor:
    """``[blocks_x, blocks_y]`` minibatch CKA; ``images_x[i]`` and ``images_y[i]`` are the same
    image (at each model's resolution). A trailing minibatch of fewer than 4 images is skipped."""
    if batch_size < 4:
        raise AnalysisError(f"--batch-size {batch_size}: unbiased HSIC needs minibatches of at least 4 images")
    n = images_x.shape[0]
    tail = n % batch_size
    usable = n - tail if tail < 4 else n
    if usable < 4:
        raise AnalysisError(f"CKA needs minibatches of at least 4 images; got {images_x.shape[0]} "
                            f"images with --batch-size {batch_size}")
    acc = MinibatchCKA(len(model_x.blocks), len(model_y.blocks))
    dev_x, dev_y = next(model_x.parameters()).device, next(model_y.parameters()).device
    starts = range(0, usable, batch_size)
    itself = model_x is model_y and images_x is images_y
    for s in progress(starts, len(starts), "cka"):
        gx = block_grams(model_x, images_x[s:s + batch_size].to(dev_x)).cpu()
        acc.update(gx, gx if itself else block_grams(model_y, images_y[s:s + batch_size].to(dev_y)).cpu())
    return acc.value().float()


def run(encoders: list[Encoder], source, out: Path, batch_size: int, device: str) -> tuple[Path, Path]:
    if len(encoders) not in (1, 2):
        raise AnalysisError(f"analyze cka compares two checkpoints (or one with itself); got {len(encoders)}")
    x, y = encoders[0], encoders[-1]
    mx, my = x.model.to(device), y.model.to(device)
    matrix = layer_cka(mx, source.at(mx.patch_embed.img_size[0]), my, source.at(my.patch_embed.img_size[0]),
                       batch_size)
    header = (f"{x.label} \\ {y.label}", *(f"block_{j}" for j in range(matrix.shape[1])))
    rows = [(f"block_{i}", *map(float, matrix[i])) for i in range(matrix.shape[0])]
    csv = write_csv(out / "cka.csv", header, rows)
    return csv, save_figure(_figure(matrix, x.label, y.label), out / "cka.png")


def _figure(matrix: torch.Tensor, label_x: str, label_y: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    im = ax.imshow(matrix.numpy(), origin="lower", cmap="magma", vmin=0, vmax=1)
    ax.set_xlabel(f"{label_y}: block")
    ax.set_ylabel(f"{label_x}: block")
    ax.set_title("linear CKA (minibatch, unbiased HSIC)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig
