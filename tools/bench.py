"""``mimscale bench <name>``: benchmarks that print ratios measured in one run.

Each benchmark lives next to the code it measures, as a module with ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them, so ``mimscale bench --help`` shows what exists.
A benchmark's module (which needs torch) is imported only when its command line is parsed, so
building the command line for another command does not load it.
"""

from __future__ import annotations

import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "masking": ("mimscale.pretrain.masking.bench", "mask time, FLOP ratio, time ratio and overhead of every strategy against an MAE step"),
    "data": ("mimscale.data_pipeline.bench", "images/s of every data source vs torchvision ImageFolder + DataLoader"),
    "step": ("mimscale.pretrain.engine.bench_step", "images/s, TFLOP/s, MFU, data wait and peak memory of the real training step"),
}


def _deferred(parser_class: type) -> type:
    """A subclass of the CLI's parser class whose arguments come from a module, imported the first
    time the parser parses (that is, when its benchmark was named, ``--help`` included)."""

    class Deferred(parser_class):
        def __init__(self, *args, module: str, **kwargs):
            super().__init__(*args, **kwargs)
            self._module = module

        def parse_known_args(self, args=None, namespace=None):
            if self._module is not None:
                mod = importlib.import_module(self._module)
                self._module = None
                mod.add_arguments(self)
                self.set_defaults(func=mod.run)
            return super().parse_known_args(args, namespace)

    return Deferred


def register(sub) -> None:
    if not BENCHMARKS:
        return
    p = sub.add_parser("bench", help="speed/memory benchmarks that print ratios measured in one run")
    bsub = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True, parser_class=_deferred(type(p)))
    for name, (module, help_text) in BENCHMARKS.items():
        bsub.add_parser(name, help=help_text, module=module)
