"""``mimscale launch``, ``mimscale sweep`` and ``mimscale status``."""

from __future__ import annotations

import argparse

from mimscale.config import ConfigError

from .executor import add_scheduler_arguments, options_from_args

LAUNCH_EXAMPLE = """example (2 nodes x 8 GPUs, requeued on preemption and at the time limit):
  mimscale launch pretrain recipe=gpa model.name=mae_vit_large_patch16 schedule.epochs=800 \\
      output.dir=/checkpoint/$USER/gpa_vitl_800 --nodes 2 --gpus-per-node 8 --partition learn --time 72:00:00"""


def _cmd_launch(args) -> int:
    from .launch import launch, prepare

    # Scheduler options may also follow the command and its overrides: read them back out.
    again = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_scheduler_arguments(again)
    again.add_argument("--run-dir", default=None)
    _, rest = again.parse_known_args(args.rest, namespace=args)
    options = options_from_args(args)
    run = prepare([args.command_to_launch, *rest], args.run_dir)
    launch(run, options, dry_run=args.dry_run)
    return 0


def _cmd_sweep(args) -> int:
    from .sweep import submit_sweep

    variables = {}
    for item in args.variables:
        if "=" not in item:
            raise ConfigError(f"sweep variable {item!r}: expected name=value")
        key, value = item.split("=", 1)
        variables[key] = value
    submit_sweep(args.file, variables, options_from_args(args), dry_run=args.dry_run)
    return 0


def _cmd_status(args) -> int:
    from .status import cancel, folder_states, format_states

    if args.cancel:
        jobs = cancel(args.folder)
        print(f"cancelled {len(jobs)} job(s){': ' + ', '.join(jobs) if jobs else ''}")
    states = folder_states(args.folder)
    print(format_states(states))
    return 1 if any(s.state == "failed" for s in states) else 0


def register(sub) -> None:
    p = sub.add_parser(
        "launch", help="run a command as a SLURM job (submitit): multi-node, requeued on preemption",
        description="Submit `mimscale COMMAND ARGS...` as a submitit job: one task per GPU, "
                    "torch.distributed initialised from the job, a run folder with the config, "
                    "checkpoints, every rank's logs and the job history. On preemption or the time "
                    "limit the run checkpoints at the next step and requeues itself (resume=auto).",
        epilog=LAUNCH_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scheduler_arguments(p)
    p.add_argument("--run-dir", default=None,
                   help="run folder when the command has no output.dir (default: a new folder "
                        "under the command's default output.dir)")
    p.add_argument("command_to_launch", metavar="COMMAND", help="a mimscale command, e.g. pretrain, finetune")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the command's key=value overrides and flags (scheduler options may be mixed in)")
    p.set_defaults(func=_cmd_launch)

    p = sub.add_parser(
        "sweep", help="submit a sweep file as one job array (one run folder per element)",
        description="Expand a sweep file (a base command + overrides, grids; see "
                    "mimscale.downstream.sweeps) and submit the elements that are not done or still "
                    "running as one job array. --dry-run lists the elements.")
    p.add_argument("file", help="a sweep YAML file or the name of a shipped one (e.g. standard)")
    p.add_argument("variables", nargs="*", help="the file's vars as name=value, e.g. checkpoint=runs/x out=runs/x/bench")
    add_scheduler_arguments(p, array=True)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("status", help="state of a launched run or of every element of a sweep",
                       description="queued / running / done / stopped / failed (with the last error "
                                   "line), how many times each was requeued, and its job ids.")
    p.add_argument("folder", help="a run folder (mimscale launch) or a sweep folder (mimscale sweep)")
    p.add_argument("--cancel", action="store_true", help="cancel the queued and running jobs first (scancel)")
    p.set_defaults(func=_cmd_status)
