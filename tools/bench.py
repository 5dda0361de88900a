"""``mimscale bench <name>``: benchmarks that print ratios measured in one run.

Each benchmark lives next to the code it measures, as a module with ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them, so ``mimscale bench --help`` shows what exists.
"""

from __future__ import annotations

import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "masking": ("mimscale.pretrain.masking.bench", "mask time, FLOP ratio, time ratio and overhead of every strategy against an MAE step"),
    "data": ("mimscale.data_pipeline.bench", "images/s of every data source vs torchvision ImageFolder + DataLoader"),
    "step": ("mimscale.pretrain.engine.bench_step", "images/s, TFLOP/s, MFU, data wait and peak memory of the real training step"),
}


def register(sub) -> None:
    if not BENCHMARKS:
        return
    p = sub.add_parser("bench", help="speed/memory benchmarks that print ratios measured in one run")
    bsub = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        b = bsub.add_parser(name, help=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(b)
        b.set_defaults(func=mod.run)
