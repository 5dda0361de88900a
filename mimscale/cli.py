"""The ``mimscale`` command. Each subcommand parses its flags and ``key=value`` overrides, builds
the config (failing fast on a bad key or value) and hands over to the code that does the work."""

from __future__ import annotations

import argparse
import importlib
import sys

from mimscale import __version__
from mimscale.config import ConfigError, available_recipes, load_config, to_yaml
from mimscale.errors import UserError

OVERRIDES_HELP = "config overrides as key=value, e.g. recipe=mae model.name=mae_vit_tiny_patch16 optim.blr=1e-4"


def _cmd_demo(args) -> int:
    from mimscale.demo import run_demo

    return run_demo(steps=args.steps, out=args.out, overrides=args.overrides)


def _cmd_pretrain(args) -> int:
    from mimscale.pretrain.engine.trainer import Trainer

    cfg = load_config(args.overrides)
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    summary = Trainer(cfg).fit()
    print(f"done: {summary.steps} steps in {summary.wall_time:.1f}s; checkpoint {summary.checkpoint}")
    return 0


def _cmd_config_show(args) -> int:
    cfg = load_config(args.overrides)
    sys.stdout.write(to_yaml(cfg))
    return 0


def _cmd_config_recipes(args) -> int:
    print("\n".join(available_recipes()))
    return 0


# Subsystems that add their own subcommands: each module has ``register(subparsers)``, which adds
# its parsers with ``set_defaults(func=...)``; a handler returns the exit code.
COMMAND_MODULES: list[str] = [
    "mimscale.tools.bench",
    "mimscale.tools.visualize",
    "mimscale.tools.select_head",
    "mimscale.data_pipeline.cli",
    "mimscale.tools.convert",
    "mimscale.tools.analysis.cli",
    "mimscale.downstream.dense.cli",
    "mimscale.downstream.classify.cli",
    "mimscale.downstream.results",
    "mimscale.slurm.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimscale", description="Masked-image-modeling pretraining of Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"mimscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="tiny MAE pretraining on generated images, on the CPU (a few minutes)",
                       description="Generate (once, cached) a small synthetic image set and pretrain a tiny "
                                   "MAE on it; prints where the checkpoint, metrics, logs and figures are.")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300)")
    p.add_argument("--out", default=None, help="run folder (default runs/demo/<timestamp>)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("pretrain", help="pretrain from a recipe plus key=value overrides",
                       description="Pretrain from a recipe (recipe=NAME or a YAML path) plus overrides. "
                                   "Runs single-process, or data-parallel under torchrun/srun.")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("config", help="inspect configs and recipes")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    c = csub.add_parser("show", help="print the resolved config of a recipe plus overrides")
    c.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    c.set_defaults(func=_cmd_config_show)
    c = csub.add_parser("recipes", help="list the shipped recipes")
    c.set_defaults(func=_cmd_config_recipes)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def dispatch(argv: list[str]) -> int:
    """Run one command and let its errors propagate (``main`` turns them into messages; a SLURM
    job records them)."""
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    joined = _in_process_group()
    try:
        code = args.func(args)
    except ConfigError as e:
        print(f"mimscale: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, UserError) as e:
        print(f"mimscale: {e}", file=sys.stderr)
        return 2
    if not joined and _in_process_group():  # the command joined one (torchrun, srun): leave it
        from mimscale.pretrain.engine.backend import leave_process_group

        leave_process_group(together=True)
    return code


def _in_process_group() -> bool:
    dist = sys.modules.get("torch.distributed")  # never imported: never joined
    return dist is not None and dist.is_available() and dist.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
