"""What every classification command does around its protocol: processes and backend, the
encoder's architecture and weights, the run folder, and the result JSONs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mimscale.config import to_yaml
from mimscale.downstream.results import write_result
from mimscale.pretrain.engine.backend import Backend, DistEnv, build_backend, init_distributed
from mimscale.pretrain.engine.rng import seed_everything

from .config import config_hash
from .weights import PretrainedWeights, cached_weights


@dataclass
class Run:
    env: DistEnv
    backend: Backend
    run_dir: Path
    weights: PretrainedWeights | None
    model: str          # build_mae preset
    patch_size: int
    img_size: int

    @property
    def label(self) -> str:
        return self.weights.label if self.weights is not None else "random-init"

    @property
    def pretrain_recipe(self) -> str | None:
        return self.weights.recipe if self.weights is not None else None

    @property
    def mask_ratio(self) -> float | None:
        return self.weights.mask_ratio if self.weights is not None else None

    def provenance(self) -> dict:
        """What a classifier checkpoint records about the pretrained encoder it started from."""
        return {"label": self.label, "recipe": self.pretrain_recipe, "mask_ratio": self.mask_ratio}

    def say(self, *args) -> None:
        if self.env.is_main:
            print(*args, flush=True)


def start(cfg) -> Run:
    """Join the process group (torchrun/srun), build the backend, resolve the encoder."""
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    device_type = "cuda" if cfg.engine.device == "cuda" or (
        cfg.engine.device == "auto" and torch.cuda.is_available()) else "cpu"
    env = init_distributed(device_type)
    # deepspeed owns clipping and accumulation, so it reads them (knn has no optimizer)
    backend = build_backend(cfg.engine, env, getattr(cfg, "optim", None), cfg.data.batch_size)
    run_dir = Path(cfg.output.dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    seed_everything(cfg.engine.seed)  # identical heads on every rank
    weights = cached_weights(cfg.checkpoint) if cfg.checkpoint else None
    if weights is not None:
        model, patch = weights.architecture(cfg.model.name)
        patch = cfg.model.patch_size or patch
        img = cfg.model.img_size or weights.meta.get("img_size") or weights.pretrain_img_size()
    else:
        from mimscale.pretrain.models import MODEL_SIZES

        model = cfg.model.name
        patch = cfg.model.patch_size or MODEL_SIZES[model]["patch_size"]
        img = cfg.model.img_size or 224
    if img % patch:
        raise ValueError(f"model.img_size {img} is not a multiple of the patch size {patch}")
    return Run(env, backend, run_dir, weights, model, patch, img)


def benchmark(cfg, protocol: str, variant: str | None = None) -> str:
    """``<dataset>[@<subset>]/<protocol>[+<variant>]``, e.g. ``imagenet@1%/finetune+occlude50``."""
    d = cfg.data
    name = d.dataset if d.fold == 1 else f"{d.dataset}-fold{d.fold}"
    if d.subset is not None:
        name += f"@{100 * d.subset:g}%"
    elif d.subset_file:
        name += f"@{Path(d.subset_file).stem}"
    return f"{name}/{protocol}" + (f"+{variant}" if variant else "")


def report(run: Run, cfg, protocol: str, metrics: dict, epochs: float | None, variant: str | None = None,
           **extra) -> Path | None:
    """Write one result JSON (main rank) and print it."""
    name = benchmark(cfg, protocol, variant)
    run.say(f"{name}: top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  ({metrics['n']} samples)")
    if not run.env.is_main:
        return None
    return write_result(run.run_dir, name, "top1", metrics["top1"], checkpoint=run.label,
                        recipe=run.pretrain_recipe, epochs=epochs, config_hash=config_hash(cfg),
                        metrics=metrics, mask_ratio=run.mask_ratio, protocol=protocol,
                        protocol_recipe=getattr(cfg, "recipe", None), dataset=cfg.data.dataset, variant=variant,
                        pool=cfg.model.pool,
                        checkpoint_path=str(cfg.checkpoint) if cfg.checkpoint else None, **extra)


class progress_bar:
    """A rich progress bar on the main rank's terminal (``output.progress``: auto | on | off);
    calling it advances by ``n``."""

    def __init__(self, run: Run, total: int, label: str, mode: str = "auto"):
        import sys

        self.bar = None
        if run.env.is_main and (mode == "on" or (mode == "auto" and sys.stdout.isatty())):
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn())
            self.task = self.bar.add_task(label, total=total)

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
