"""``mimscale analyze attention|cka|masks|pimr`` and ``mimscale plot RUN…``."""

from __future__ import annotations

import argparse
from pathlib import Path

from mimscale.config import STRATEGIES

from .output import AnalysisError

CHECKPOINTS_HELP = ("mimscale run folder (newest checkpoint), step_* folder or state.pt, official MAE .pth, "
                    "or timm state dict (.pth/.safetensors)")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise AnalysisError("--device cuda: no CUDA device is available; use --device cpu")
    return name


def _common(p: argparse.ArgumentParser, out: str, num: int, batch: int) -> None:
    p.add_argument("--images", default=None, help="folder of images (default: generated synthetic images)")
    p.add_argument("--num-images", type=int, default=num, help=f"images analysed (default {num})")
    p.add_argument("--batch-size", type=int, default=batch, help=f"images per forward pass (default {batch})")
    p.add_argument("--seed", type=int, default=0, help="which synthetic images / mask draws")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default=out, help=f"output folder (default {out})")


def _checkpoint_args(p: argparse.ArgumentParser, nargs: str) -> None:
    p.add_argument("checkpoints", nargs=nargs, metavar="CHECKPOINT", help=CHECKPOINTS_HELP)
    p.add_argument("--labels", default=None, help="comma-separated names for the checkpoints in figures")
    p.add_argument("--model", default=None, help="model preset when the weights' shapes fit several")


def register(sub) -> None:
    p = sub.add_parser("analyze", help="attention distance/entropy, CKA, mask coverage, PIMR: CSV + PNG")
    asub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    a = asub.add_parser("attention", help="mean attention distance (pixels) and entropy per block and head",
                        description="Per block and head: mean attention distance in pixels and attention "
                                    "entropy (CLS dropped, re-softmaxed), one colour per checkpoint.")
    _checkpoint_args(a, "+")
    _common(a, "analysis/attention", 32, 16)
    a.set_defaults(func=_attention)

    c = asub.add_parser("cka", help="minibatch linear CKA between every block of two checkpoints",
                        description="Minibatch linear CKA (unbiased HSIC) between the block inputs of two "
                                    "checkpoints, or of one with itself.")
    _checkpoint_args(c, "+")
    _common(c, "analysis/cka", 64, 32)
    c.set_defaults(func=_cka)

    m = asub.add_parser("masks", help="fraction of object / background patches each strategy hides vs random",
                        description="Per strategy: object and background patches hidden, against random at "
                                    "the same per-image counts; for adaptive ratios (AMR) their histogram and "
                                    "correlation with object size.")
    m.add_argument("--checkpoint", default=None, help="scorer weights: " + CHECKPOINTS_HELP.split(", or timm")[0])
    m.add_argument("--strategies", default=",".join(STRATEGIES),
                   help="comma-separated masking.strategy names; name=CHECKPOINT gives one its own weights")
    m.add_argument("--masks", default=None, help="with --images: folder of foreground PNGs (same relative names)")
    m.add_argument("--progress", type=float, default=1.0,
                   help="where in training the schedules stand (GPA soft-to-hard): 0 start, 1 end (default)")
    _common(m, "analysis/masks", 64, 32)
    m.add_argument("overrides", nargs="*", help="config overrides, e.g. masking.ratio=0.6 model.img_size=64")
    m.set_defaults(func=_masks)

    r = asub.add_parser("pimr", help="PIMR and Global PIMR over mask ratios from a results table",
                        description="PIMR (eq. 5) and Global PIMR (eq. 6) of seed 003 from (model, mask ratio, "
                                    "accuracy) rows: a CSV, JSON / JSONL records, or a folder of them.")
    r.add_argument("table", help="CSV / JSON / JSONL file, or a folder of them (e.g. downstream results)")
    r.add_argument("--model-key", default=None, help="column naming the model (default: model, recipe or checkpoint)")
    r.add_argument("--ratio-key", default=None, help="column of the mask ratio (default: mask_ratio or ratio)")
    r.add_argument("--value-key", default=None, help="column of the accuracy (default: accuracy, acc, top1 or value)")
    r.add_argument("--benchmark", default=None, help="keep only records whose 'benchmark' is this")
    r.add_argument("--out", default="analysis/pimr", help="output folder (default analysis/pimr)")
    r.set_defaults(func=_pimr)

    pl = sub.add_parser("plot", help="PNG curves of a run's metrics (several runs overlaid)",
                        description="Every logged metric of the runs' metrics.jsonl, grouped into panels: "
                                    "loss terms, per-shot losses, PLB distribution, mask ratios, salience "
                                    "entropy, lr, throughput, ...")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run folder or metrics.jsonl file")
    pl.add_argument("--x", choices=("step", "time"), default="step", help="x axis (default step)")
    pl.add_argument("--smooth", type=float, default=0.0, help="EMA smoothing weight in [0, 1) (default 0)")
    pl.add_argument("--out", default="analysis/curves", help="output folder (default analysis/curves)")
    pl.set_defaults(func=_plot)


def _encoders(args):
    from .encoders import load_encoder

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else [None] * len(args.checkpoints)
    if len(labels) != len(args.checkpoints):
        raise AnalysisError(f"--labels names {len(labels)} checkpoints but {len(args.checkpoints)} were given")
    encoders = [load_encoder(c, args.model, label) for c, label in zip(args.checkpoints, labels)]
    names = [e.label for e in encoders]
    for i, e in enumerate(encoders):  # keep legends and CSV rows apart
        if names.count(e.label) > 1:
            e.label = f"{e.label}#{i + 1}"
    return encoders


def _positive(args) -> None:
    for flag in ("num_images", "batch_size"):
        if getattr(args, flag) < 1:
            raise AnalysisError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")


def _attention(args) -> int:
    from . import attention
    from .images import ImageSource

    _positive(args)
    encoders = _encoders(args)
    source = ImageSource(args.images, args.num_images, args.seed)
    csv, png = attention.run(encoders, source, Path(args.out), args.batch_size, _device(args.device))
    print(f"attention distance and entropy of {', '.join(e.label for e in encoders)} over {source.describe()}")
    print(f"wrote {csv} and {png}")
    return 0


def _cka(args) -> int:
    from . import cka
    from .images import ImageSource

    _positive(args)
    encoders = _encoders(args)
    source = ImageSource(args.images, args.num_images, args.seed)
    csv, png = cka.run(encoders, source, Path(args.out), args.batch_size, _device(args.device))
    print(f"linear CKA {encoders[0].label} vs {encoders[-1].label} over {source.describe()}")
    print(f"wrote {csv} and {png}")
    return 0


def _masks(args) -> int:
    from . import masks

    _positive(args)
    csv, per_image, png, rows = masks.run(args.strategies, args.checkpoint, args.overrides, Path(args.out),
                                          args.images, args.masks, args.num_images, args.seed, args.batch_size,
                                          args.progress, _device(args.device))
    print(masks.format_table(rows))
    print(f"wrote {csv}, {per_image} and {png}")
    return 0


def _pimr(args) -> int:
    from .pimr import format_table, run

    csv, png, rows = run(args.table, Path(args.out), args.model_key, args.ratio_key, args.value_key,
                              args.benchmark)
    print(format_table(rows))
    print(f"wrote {csv} and {png}")
    return 0


def _plot(args) -> int:
    from . import curves

    csv, png, panels = curves.run(args.runs, Path(args.out), args.x, args.smooth)
    print(f"{len(args.runs)} run(s), panels: {'; '.join(panels)}")
    print(f"wrote {csv} and {png}")
    return 0
