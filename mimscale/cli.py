"""The ``mimscale`` command. Each subcommand parses its flags and ``key=value`` overrides, builds
the config (failing fast on a bad key or value) and hands over to the code that does the work."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from mimscale import __version__
from mimscale.config import available_recipes, load_config, missing_values, to_yaml
from mimscale.errors import UserError

OVERRIDES_HELP = "config overrides as key=value, e.g. recipe=mae model.name=mae_vit_tiny_patch16 optim.blr=1e-4"


def _cmd_demo(args) -> int:
    from mimscale.demo import run_demo

    return run_demo(steps=args.steps, out=args.out, overrides=args.overrides)


def _cmd_pretrain(args) -> int:
    from mimscale.pretrain.engine.trainer import Trainer

    if args.print_config:
        return _cmd_config_show(args)
    cfg = load_config(args.overrides)
    summary = Trainer(cfg).fit()
    if summary.is_main:  # under torchrun, one line for the run, not one per rank
        print(summary.describe())
    return 0


def _cmd_config_show(args) -> int:
    """The resolved config, even one a run would refuse for a missing value: those are marked
    (``# required: ...``) and listed on stderr, so the YAML can be completed."""
    cfg = load_config(args.overrides, require=False)
    missing = missing_values(cfg)
    sys.stdout.write(to_yaml(cfg, notes={k: f"required {why}" for k, why in missing.items()}))
    if missing:
        print(f"mimscale: a run needs {', '.join(missing)} (marked '# required')", file=sys.stderr)
    return 0


def _cmd_config_recipes(args) -> int:
    print("\n".join(available_recipes()))
    return 0


# Subsystems that add their own subcommands: each module has ``register(subparsers)``, which adds
# its parsers with ``set_defaults(func=...)``; a handler returns the exit code. Every command line
# imports all of them (and their packages), so they import torch and other heavy modules inside
# their handlers, never at module level (tests/test_cli_startup.py checks).
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
    "mimscale.downstream.studies.cli",
    "mimscale.slurm.cli",
]


# Positionals that collect ``key=value`` items; such items may also follow or sit between flags.
KEY_VALUE_DESTS = ("overrides", "variables")


class _Parser(argparse.ArgumentParser):
    """Lets ``key=value`` overrides appear anywhere on a command line, for every (sub)command.

    argparse fills a ``nargs="*"`` positional from its first run of tokens only and leaves later
    ones over as unrecognized; the parser that owns the positional takes them back here, in order.
    Subparsers are of this class too (``add_subparsers`` uses the parent's class), and
    ``parse_intermixed_args`` does not support subparsers. Leftover flags stay errors.
    """

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        dest = next((a.dest for a in self._actions if a.dest in KEY_VALUE_DESTS and a.nargs in ("*", "+")), None)
        if dest is not None:
            items = [t for t in extras if not t.startswith("-")]
            setattr(namespace, dest, list(getattr(namespace, dest) or []) + items)
            extras = [t for t in extras if t.startswith("-")]
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mimscale", description="Masked-image-modeling pretraining of Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"mimscale {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a bad-input error (also MIMSCALE_DEBUG=1)")
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


# Bad input: a config, a path, a file's contents. Anything else is a bug and keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def error_line(e: BaseException) -> str:
    """One line saying what is wrong and where (a file error names its path)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """The command line: bad input ends as one line on stderr and exit code 2; ``--debug`` or
    ``MIMSCALE_DEBUG=1`` adds the traceback."""
    args = build_parser().parse_args(argv)
    joined = _in_process_group()
    try:
        code = args.func(args)
    except USER_ERRORS as e:
        if args.debug or os.environ.get("MIMSCALE_DEBUG", "0") not in ("", "0"):
            traceback.print_exc()
        print(f"mimscale {args.command}: {error_line(e)}", file=sys.stderr)
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
