"""``mimscale analyze masks``: how much of the objects each masking strategy hides.

For every strategy, over images whose foreground is known at the patch level: the fraction of object
patches hidden and of background patches hidden, pooled over images, against what ``random`` hides
at the same per-image counts (its expectation, ``count/N`` of each, so no sampling noise). Strategies
whose ratio differs per image (AMR) also get the histogram of their ratios and the Pearson
correlation of ratio with object size (the fraction of object patches).

Masks come from ``MIMMethod.make_mask`` with the strategy named by ``masking.strategy``, so any
strategy the config accepts is analysed as the trainer would run it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mimscale.config import STRATEGIES

from .output import AnalysisError, progress, pyplot, save_figure, write_csv

VARYING = 1e-9  # per-image ratios with a larger spread count as adaptive


@dataclass
class Coverage:
    """Per-image results of one strategy: ``[n]`` each."""

    ratio: torch.Tensor            # fraction of patches hidden
    object_size: torch.Tensor      # fraction of patches that are object
    object_hits: torch.Tensor      # object patches hidden
    background_hits: torch.Tensor  # background patches hidden
    objects: torch.Tensor          # object patches
    backgrounds: torch.Tensor      # background patches

    @classmethod
    def of(cls, mask: torch.Tensor, fg: torch.Tensor) -> Coverage:
        mask, fg = mask.bool().cpu(), fg.bool().cpu()
        return cls(mask.float().mean(1), fg.float().mean(1), (mask & fg).sum(1).float(),
                   (mask & ~fg).sum(1).float(), fg.sum(1).float(), (~fg).sum(1).float())

    def object_hidden(self) -> float:
        return float(self.object_hits.sum() / self.objects.sum().clamp_min(1))

    def background_hidden(self) -> float:
        return float(self.background_hits.sum() / self.backgrounds.sum().clamp_min(1))

    def random_expectation(self) -> tuple[float, float]:
        """(object, background) fractions ``random`` hides in expectation at the same counts."""
        obj = (self.ratio * self.objects).sum() / self.objects.sum().clamp_min(1)
        bg = (self.ratio * self.backgrounds).sum() / self.backgrounds.sum().clamp_min(1)
        return float(obj), float(bg)

    @property
    def adaptive(self) -> bool:
        return len(self.ratio) > 1 and float(self.ratio.std()) > VARYING

    def size_correlation(self) -> float:
        """Pearson correlation of per-image ratio with object size (NaN if either is constant)."""
        r, s = self.ratio.double(), self.object_size.double()
        r, s = r - r.mean(), s - s.mean()
        denom = float((r.norm() * s.norm()))
        return float((r * s).sum()) / denom if denom > 0 else math.nan


def parse_strategies(spec: str, checkpoint: str | None) -> list[tuple[str, str, str | None]]:
    """``"random,idm,sbam=sal.pth"`` -> ``[(label, strategy, checkpoint), …]``; a per-strategy
    checkpoint replaces ``--checkpoint`` for that strategy's scorer."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, own = item.partition("=")
        if name not in STRATEGIES:
            raise AnalysisError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)} "
                                "(optionally name=CHECKPOINT for its own scorer weights)")
        label = f"{name} ({Path(own).stem})" if own else name
        out.append((label, name, own or checkpoint))
    if not out:
        raise AnalysisError(f"--strategies {spec!r} names no strategy; valid: {', '.join(STRATEGIES)}")
    return out


def set_training_point(method, cfg, progress_fraction: float) -> None:
    """Put the method's schedules (GPA soft-to-hard, SBAM warm-up) where a run of ``cfg`` stands
    after ``progress_fraction`` of its epochs."""
    epochs = cfg.schedule.epochs
    per_epoch = 100
    total = epochs * per_epoch
    method.set_progress(min(total - 1, round(progress_fraction * total)), total, per_epoch)


@torch.no_grad()
def masks_of(method, images: torch.Tensor, batch_size: int, seed: int, description: str) -> torch.Tensor:
    """``[n, N]`` bool masks of ``method`` over ``images``, batch by batch."""
    generator = torch.Generator().manual_seed(seed)
    device = next(method.student.parameters()).device
    starts = range(0, images.shape[0], batch_size)
    return torch.cat([method.make_mask(images[s:s + batch_size].to(device), generator).mask.cpu()
                      for s in progress(starts, len(starts), description)])


def images_with_foreground(folder: str | None, mask_folder: str | None, num: int, size: int, patch: int,
                           seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images ``[n, 3, size, size]``, patch foreground ``[n, N]``): generated, or a folder + masks."""
    from .images import image_paths, load_foreground, load_images, synthetic

    if folder is None:
        if mask_folder is not None:
            raise AnalysisError("--masks needs --images: the folder of images the masks belong to")
        return synthetic(num, size, patch, seed)
    if mask_folder is None:
        raise AnalysisError("analyze masks needs each image's foreground: give --masks DIR (PNGs whose "
                            "non-zero pixels are the object), or leave out --images for the synthetic set")
    paths = image_paths(folder, num)
    return load_images(paths, size), load_foreground(paths, folder, mask_folder, size, patch)


def run(spec: str, checkpoint: str | None, overrides: list[str], out: Path, images: str | None = None,
        masks: str | None = None, num: int = 64, seed: int = 0, batch_size: int = 32,
        progress_fraction: float = 1.0, device: str = "cpu"):
    """Coverage of every strategy in ``spec``; writes masks.csv, masks_per_image.csv, masks.png."""
    from ..common import config_for
    from ..visualize import strategy_methods
    from .encoders import model_overrides, resolve_mimscale

    if not 0 <= progress_fraction <= 1:
        raise AnalysisError(f"--progress {progress_fraction}: must be in [0, 1] (0 = start of training, 1 = end)")
    data: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    results: dict[str, Coverage] = {}
    for label, name, ckpt in parse_strategies(spec, checkpoint):
        inferred = []
        if ckpt is not None:  # a run folder means its newest checkpoint; other files describe themselves
            ckpt = str(resolve_mimscale(Path(ckpt)) or ckpt)
            inferred = model_overrides(ckpt)
        cfg = config_for(ckpt, inferred + list(overrides))
        method = strategy_methods(cfg, [name], ckpt)[name].to(device)
        set_training_point(method, cfg, progress_fraction)
        key = (method.student.patch_embed.img_size[0], method.student.patch_size)
        if key not in data:
            data[key] = images_with_foreground(images, masks, num, *key, seed)
        imgs, fg = data[key]
        results[label] = Coverage.of(masks_of(method, imgs, batch_size, seed, label), fg)
    return write_results(results, out)


def table_rows(results: dict[str, Coverage]) -> list[tuple]:
    rows = []
    for label, c in results.items():
        rand_obj, rand_bg = c.random_expectation()
        obj = c.object_hidden()
        rows.append((label, len(c.ratio), float(c.ratio.mean()), obj, c.background_hidden(), rand_obj, rand_bg,
                     obj / rand_obj if rand_obj > 0 else math.nan,
                     c.size_correlation() if c.adaptive else ""))
    return rows


HEADER = ("strategy", "images", "mean_ratio", "object_hidden", "background_hidden", "random_object_hidden",
          "random_background_hidden", "object_lift", "ratio_size_corr")


def write_results(results: dict[str, Coverage], out: Path) -> tuple[Path, Path, Path, list[tuple]]:
    rows = table_rows(results)
    csv = write_csv(out / "masks.csv", HEADER, rows)
    per_image = [(label, i, float(c.ratio[i]), float(c.object_size[i]),
                  float(c.object_hits[i] / c.objects[i]) if c.objects[i] else math.nan,
                  float(c.background_hits[i] / c.backgrounds[i]) if c.backgrounds[i] else math.nan)
                 for label, c in results.items() for i in range(len(c.ratio))]
    per_csv = write_csv(out / "masks_per_image.csv", ("strategy", "image", "mask_ratio", "object_size",
                                                        "object_hidden", "background_hidden"), per_image)
    return csv, per_csv, save_figure(_figure(results), out / "masks.png"), rows


def format_table(rows) -> str:
    lines = ["| strategy | mean ratio | object hidden | background hidden | random: object | lift | ratio~size r |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, _, ratio, obj, bg, r_obj, _, lift, corr in rows:
        corr_s = f"{corr:+.2f}" if isinstance(corr, float) else ""
        lines.append(f"| {label} | {ratio:.3f} | {obj:.3f} | {bg:.3f} | {r_obj:.3f} | {lift:.2f}x | {corr_s} |")
    return "\n".join(lines)


def _figure(results: dict[str, Coverage]):
    plt = pyplot()
    adaptive = {k: c for k, c in results.items() if c.adaptive}
    panels = 1 + 2 * bool(adaptive)
    fig, axes = plt.subplots(1, panels, figsize=(max(4.5, 0.7 * len(results) + 2) + 3.8 * (panels - 1), 3.6),
                             squeeze=False)
    ax = axes[0][0]
    labels = list(results)
    xs = torch.arange(len(labels)).float()
    obj = [c.object_hidden() for c in results.values()]
    bg = [c.background_hidden() for c in results.values()]
    rand = [c.random_expectation()[0] for c in results.values()]
    ax.bar(xs - 0.2, obj, 0.4, label="object hidden", color="#c0392b")
    ax.bar(xs + 0.2, bg, 0.4, label="background hidden", color="#95a5a6")
    ax.scatter(xs - 0.2, rand, marker="_", s=400, color="black", zorder=3, label="random: object")
    ax.set_xticks(xs.tolist(), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.2)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("fraction hidden")
    ax.set_title("mask coverage of the objects", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", ncol=3, columnspacing=0.8, handlelength=1.2)
    ax.grid(axis="y", alpha=0.3)
    if adaptive:
        hist, scatter = axes[0][1], axes[0][2]
        for label, c in adaptive.items():
            step = 1.0 / float(c.objects[0] + c.backgrounds[0])  # ratios are multiples of 1/N: a bin each
            edges = torch.arange(float(c.ratio.min()) - step / 2, float(c.ratio.max()) + step, step)
            hist.hist(c.ratio.numpy(), bins=edges.numpy(), alpha=0.6, label=label)
            scatter.scatter(c.object_size.numpy(), c.ratio.numpy(), s=10, alpha=0.7,
                            label=f"{label}: r = {c.size_correlation():+.2f}")
        hist.set_xlabel("per-image mask ratio")
        hist.set_ylabel("images")
        hist.set_title("adaptive ratios", fontsize=10)
        hist.legend(fontsize=7)
        scatter.set_xlabel("object size (fraction of patches)")
        scatter.set_ylabel("mask ratio")
        scatter.set_title("ratio vs object size", fontsize=10)
        scatter.legend(fontsize=7)
        for a in (hist, scatter):
            a.grid(alpha=0.3)
    fig.tight_layout()
    return fig
