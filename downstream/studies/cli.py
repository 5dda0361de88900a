"""``mimscale study FILE``: pretrain every recipe x seed, evaluate every checkpoint, write the report."""

from __future__ import annotations

import argparse
import time

STUDY_EXAMPLE = """examples:
  mimscale study tiny                                  # the shipped CPU study, here, one step after another
  mimscale study downstream/studies/tiny.yaml --out runs/studies/tiny2
  mimscale study vitb --cluster slurm --gpus-per-node 8 --partition learn --time 12:00:00
                                                       # one job array per wave; run it again for the next
  mimscale study tiny --report                         # only (re)write the table from what is done"""


def _cmd_study(args) -> int:
    from . import load_study
    from .plan import plan
    from .report import write_report
    from .run import find_step, prepare_data, run_here, run_step, submit

    study = load_study(args.file, args.out)
    if args.step:  # one step: what a study job runs
        run_step(study, find_step(study, args.step))
        return 0
    steps = plan(study)
    if args.report:
        text, paths = write_report(study, steps)
        print(text, end="")
        print(f"written: {', '.join(str(p) for p in paths)}")
        return 0
    if args.list or args.dry_run and args.cluster is None:
        for s in steps:
            print(f"{'done' if s.done() else 'todo':<5} {s.name:<28} mimscale {' '.join(s.argv)}")
        return 0
    if not args.dry_run:
        prepare_data(study)
    if args.cluster is not None:
        from mimscale.slurm.executor import options_from_args

        ready, waiting = submit(study, steps, options_from_args(args), args.dry_run)
        if all(s.done() for s in steps):
            text, paths = write_report(study, steps)
            print(text, end="")
        elif not args.dry_run:
            print(f"run `mimscale study {args.file} --out {study.out} --cluster {args.cluster} ...` again when "
                  f"these end: it submits the {len(waiting)} waiting step(s) and writes the report at the end")
        return 0
    start = time.perf_counter()
    failed = run_here(study, steps)
    text, paths = write_report(study, steps)
    print(text, end="")
    print(f"study took {time.perf_counter() - start:.0f}s here; written: {', '.join(str(p) for p in paths)}")
    if failed:
        print(f"not done: {', '.join(failed)} (run the same command again to retry them)")
        return 1
    return 0


def register(sub) -> None:
    from mimscale.slurm.executor import add_scheduler_arguments

    p = sub.add_parser(
        "study", help="pretrain every recipe x seed under one budget, evaluate, and tabulate (the proxy benchmark)",
        description="Run a study file (see mimscale.downstream.studies): the pretraining runs (each recipe x "
                    "seed, equal budget), then kNN and linear probe (CLS and mean token), mask statistics and "
                    "an untrained baseline, then study.md / study.csv / figures in the study folder. Every step "
                    "resumes: a second run does only what is missing. Without --cluster the steps run here; "
                    "with --cluster slurm|local they are submitted as job arrays.",
        epilog=STUDY_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="a study YAML file or a shipped study's name (tiny, vitb)")
    p.add_argument("--out", default=None, help="study folder (default: the file's `out`)")
    p.add_argument("--list", action="store_true", help="list the steps, done or not, and exit")
    p.add_argument("--report", action="store_true", help="only write the report from the steps done so far")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # one step (a study job runs this)
    add_scheduler_arguments(p, array=True)
    p.set_defaults(func=_cmd_study, cluster=None)
