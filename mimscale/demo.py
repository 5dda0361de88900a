"""``mimscale demo``: the embedded default — a tiny MAE pretraining on generated images, CPU-sized.

It is the real path (recipe ``mae``, or another one given as ``recipe=NAME``; the same trainer,
checkpoints, logs and figures as a cluster run), scaled down by overrides only: a tiny ViT at 64 px
with 8-px patches and a small decoder.
"""

from __future__ import annotations

import time
from pathlib import Path

from mimscale.config import load_config

# Overrides that turn the ViT-L recipe into a CPU-sized run; anything given on the command line wins.
DEMO_OVERRIDES = [
    "recipe=mae",
    "model.name=mae_vit_tiny_patch16",
    "model.img_size=64",
    "model.patch_size=8",
    "model.decoder_embed_dim=128",
    "model.decoder_depth=2",
    "model.decoder_num_heads=4",
    "data.source=synthetic",
    "data.synthetic_images=2048",
    "data.synthetic_size=72",
    "data.batch_size=64",
    "data.num_workers=1",
    "optim.blr=2e-3",
    "schedule.warmup_steps=20",
    "engine.precision=fp32",
    "logging.log_every=10",
    "logging.image_every=100",
    "output.checkpoint_every=100",
]
DEFAULT_STEPS = 300


def demo_config(steps: int | None = None, out: str | None = None, overrides: list[str] | None = None):
    steps = steps or DEFAULT_STEPS
    out = out or str(Path("runs") / "demo" / time.strftime("%Y%m%d-%H%M%S"))
    return load_config(DEMO_OVERRIDES + [f"schedule.max_steps={steps}", f"output.dir={out}"] + list(overrides or []))


def loss_trend(losses: list[tuple[int, float]]) -> tuple[float, float]:
    """Mean logged loss over the first and the last fifth of the run (at least one record each)."""
    values = [v for _, v in losses]
    k = max(1, len(values) // 5)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def run_demo(steps: int | None = None, out: str | None = None, overrides: list[str] | None = None) -> int:
    from mimscale.pretrain.engine.trainer import Trainer

    cfg = demo_config(steps, out, overrides)
    print(f"mimscale demo: {cfg.schedule.max_steps} steps of {Path(cfg.recipe).stem} pretraining (recipe "
          f"{cfg.recipe}, {cfg.masking.strategy} masking, {cfg.model.name}, {cfg.model.img_size}px) on "
          f"{cfg.data.synthetic_images} generated images -> {cfg.output.dir}")
    summary = Trainer(cfg).fit()
    first, last = loss_trend(summary.losses)
    fell = last < 0.9 * first
    print()
    print(f"finished {summary.steps} steps in {summary.wall_time:.0f}s")
    print(f"reconstruction loss: {first:.4f} at the start -> {last:.4f} at the end "
          f"({100 * (first - last) / first:.0f}% lower)" if first > 0 else f"loss {first} -> {last}")
    print("the loss fell clearly" if fell else "WARNING: the loss did not fall by 10% — check the settings")
    print(f"  run folder   {summary.run_dir}")
    print(f"  config       {summary.run_dir / 'config.yaml'}")
    print(f"  checkpoint   {summary.checkpoint}")
    print(f"  metrics      {summary.metrics}")
    if summary.tensorboard:
        print(f"  tensorboard  tensorboard --logdir {summary.tensorboard}")
    for fig in summary.figures[-1:]:
        print(f"  figure       {fig}  (rows: image, masked input, reconstruction)")
    return 0
