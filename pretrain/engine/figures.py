"""PNG figures of a pretraining step: image, masked input, reconstruction."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

from mimscale.data_pipeline.transforms import denormalize


@torch.no_grad()
def reconstruction_grid(model, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                        path: str | Path, max_images: int = 8, min_side: int = 128) -> Path:
    """Save a 3-row grid: original, masked input (hidden patches grey), reconstruction with the
    visible patches pasted back, as in MAE's figures.

    With norm-pix targets the prediction lives in per-patch normalised space; it is mapped back
    with each patch's own mean and variance, as MAE's visualisation does.
    """
    n = min(max_images, images.shape[0])
    imgs, pred, mask = images[:n].float().cpu(), pred[:n].float().cpu(), mask[:n].cpu()
    target = model.patchify(imgs)
    if getattr(model, "norm_pix_loss", False):
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    m = mask.unsqueeze(-1).float()
    masked = model.unpatchify(target * (1 - m))
    recon = model.unpatchify(pred * m + target * (1 - m))
    rows = [denormalize(imgs), denormalize(masked) * _visible(model, mask) + 0.5 * (1 - _visible(model, mask)),
            denormalize(recon)]
    grid = torch.cat(rows).clamp(0, 1)
    if grid.shape[-1] < min_side:  # small demo images: enlarge (nearest) so patches stay crisp
        grid = grid.repeat_interleave(-(-min_side // grid.shape[-1]), dim=-1)
        grid = grid.repeat_interleave(-(-min_side // grid.shape[-2]), dim=-2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path, nrow=n, padding=2, pad_value=1.0)
    return path


def _visible(model, mask: torch.Tensor) -> torch.Tensor:
    """Pixel map [B, 1, H, W]: 1 where the patch is visible, 0 where hidden."""
    p = model.patch_size
    gh, gw = model.token_grid(mask.shape[1])
    vis = (~mask).float().reshape(-1, 1, gh, gw)
    return vis.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
