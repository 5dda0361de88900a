"""``mimscale visualize masks``: what each masking strategy scores and hides, as one PNG grid.

Rows are images; per strategy two panels: the score heatmap over the image and the masked image
(hidden patches grey). With a checkpoint, the student (and a GPA teacher) carry its weights; without
one, random initialisation shows the untrained behaviour.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from mimscale.config import STRATEGIES, apply_overrides
from mimscale.errors import UserError

if TYPE_CHECKING:
    import torch
# torch, .common and the models are imported inside the functions: building the command line
# imports this module, and ``mimscale --help`` should not load torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="mimscale checkpoint folder or official MAE .pth")
    p.add_argument("--images", default=None, help="folder of images (default: generated synthetic images)")
    p.add_argument("--num", type=int, default=4, help="number of images (rows)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated strategy names")
    p.add_argument("--out", default="masks.png", help="PNG to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. masking.ratio=0.6 masking.gpa.head=0")


def register(sub) -> None:
    p = sub.add_parser("visualize", help="figures of what the strategies do")
    vsub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    m = vsub.add_parser("masks", help="per strategy: score heatmap and mask, as a PNG grid")
    add_arguments(m)
    m.set_defaults(func=run)


def _load_images(folder: str | None, num: int, size: int, patch: int, seed: int) -> torch.Tensor:
    import torch

    from .common import synthetic_with_foreground

    if folder is None:
        return synthetic_with_foreground(num, size, patch, seed)[0]
    from mimscale.data_pipeline.pixels import load_rgb
    from mimscale.data_pipeline.transforms import eval_transform

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    if not paths:
        raise FileNotFoundError(f"no images under {folder}")
    tf = eval_transform(size)
    return torch.stack([tf(load_rgb(p)) for p in paths[:num]])


def strategy_methods(base_cfg, names: list[str], checkpoint: str | None):
    """One MIMMethod per strategy, all with the checkpoint's weights; GPA scores with a copy of the
    student when no teacher is configured, and a head/block that exist in this model."""
    from mimscale.pretrain.method import MIMMethod
    from mimscale.pretrain.models import MODEL_SIZES
    from mimscale.pretrain.teacher import TeacherEncoder

    from .common import load_student_weights

    size = MODEL_SIZES[base_cfg.model.name]
    out = {}
    for name in names:
        extra = [f"masking.strategy={name}"]
        if name == "gpa":
            gpa = base_cfg.masking.gpa
            if base_cfg.teacher.type == "none":
                extra.append("teacher.type=ema")
            if gpa.head != "mean" and gpa.head >= size["num_heads"]:
                extra.append("masking.gpa.head=mean")
            if not -size["depth"] <= gpa.block < size["depth"]:
                extra.append("masking.gpa.block=-1")
        cfg = apply_overrides(base_cfg, extra)
        method = MIMMethod(cfg).eval()
        load_student_weights(method.student, checkpoint)
        if cfg.teacher.type == "ema" and method.teacher is not None:
            method.teacher = TeacherEncoder.from_student(method.student, len(method.teacher.blocks))
        out[name] = method
    return out


def run(args) -> int:
    import torch

    with torch.no_grad():
        return _draw(args)


def _draw(args) -> int:
    import matplotlib
    import torch

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mimscale.data_pipeline.transforms import denormalize

    from .common import config_for

    cfg = config_for(args.checkpoint, args.overrides)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise UserError(f"--strategies: unknown strategies {unknown}; valid: {', '.join(STRATEGIES)}")
    patch = cfg.model.patch_size or int(cfg.model.name.rsplit("patch", 1)[-1])
    images = _load_images(args.images, args.num, cfg.model.img_size, patch, args.seed)
    methods = strategy_methods(cfg, names, args.checkpoint)
    pix = denormalize(images).permute(0, 2, 3, 1).numpy()
    n = images.shape[0]
    fig, axes = plt.subplots(n, 1 + 2 * len(names), figsize=(1.6 * (1 + 2 * len(names)), 1.7 * n), squeeze=False)
    for col, name in enumerate(names):
        method = methods[name]
        method.set_progress(0, 1, 1)
        res = method.make_mask(images, torch.Generator().manual_seed(args.seed))
        grid = method.student.grid_size
        for row in range(n):
            score = res.score[row] if res.score is not None else torch.zeros(grid[0] * grid[1])
            hidden = res.mask[row].view(*grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
            masked = pix[row].copy()
            masked[hidden.numpy()] = 0.5
            ax_s, ax_m = axes[row][1 + 2 * col], axes[row][2 + 2 * col]
            ax_s.imshow(pix[row])
            if res.score is not None:
                ax_s.imshow(score.float().view(*grid).numpy(), cmap="inferno", alpha=0.6,
                            extent=(0, pix.shape[2], pix.shape[1], 0), interpolation="nearest")
            ax_m.imshow(masked)
            if row == 0:
                ax_s.set_title(f"{name}\n{'score' if res.score is not None else '(no score)'}", fontsize=8)
                ax_m.set_title(f"{name}\nmask {res.mask[0].float().mean():.2f}", fontsize=8)
    for row in range(n):
        axes[row][0].imshow(pix[row])
        if row == 0:
            axes[row][0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}: {n} images x {len(names)} strategies ({', '.join(names)})"
          f"{' from ' + args.checkpoint if args.checkpoint else ' (random init)'}")
    return 0
