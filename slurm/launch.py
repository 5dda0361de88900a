"""``mimscale launch``: submit one command as a (multi-node) submitit job with its own run folder.

Run folder layout (the same for ``--cluster slurm`` and ``--cluster local``)::

    <run>/
        launch.json        what was submitted: the command, the scheduler options, the Python
        jobs.jsonl         job history: submitted / started / requeued / done | failed | stopped
        config.yaml        the command's resolved config (written by the command)
        checkpoints/       atomic checkpoints; a requeued job resumes from the newest
        metrics.jsonl, tb/, figures/ ...   the command's own outputs
        submitit/          submitit's pickles and the logs of every rank of every job:
                           <job id>_<rank>_log.out / .err

Before anything is queued the command resolves its config (``--print-config``), so a wrong key
fails here and not hours later on the cluster.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from mimscale.config import ConfigError

from .book import RunBook
from .executor import (
    SchedulerOptions,
    build_executor,
    cancellable_local_jobs,
    python_on_path_note,
    sbatch_script,
)
from .job import CommandJob

NOT_LAUNCHABLE = ("launch", "sweep", "status")


@dataclass
class PreparedRun:
    argv: list[str]          # what every task runs: ``mimscale <argv>``
    run_dir: Path
    resumable: bool          # the command takes resume=auto (requeued jobs continue)


def _overrides(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))


def _command_config(argv: list[str]) -> dict | None:
    """The command's resolved config (its ``--print-config``), or None if it has no config."""
    from mimscale.cli import build_parser, dispatch

    command = argv[0]
    choices = next(a for a in build_parser()._subparsers._group_actions).choices
    if command not in choices:
        raise ConfigError(f"mimscale has no command {command!r}; valid: {', '.join(sorted(choices))}")
    if command in NOT_LAUNCHABLE:
        raise ConfigError(f"{command!r} cannot be launched as a job")
    if "--print-config" not in choices[command]._option_string_actions:
        return None
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        dispatch([command, "--print-config", *argv[1:]])
    return yaml.safe_load(out.getvalue()) or {}


def prepare(argv: list[str], run_dir: str | None = None) -> PreparedRun:
    """Validate the command and pin its run folder (and ``resume=auto``) into its arguments."""
    if not argv:
        raise ConfigError("give the command to launch, e.g. mimscale launch pretrain recipe=mae ...")
    cfg = _command_config(argv)
    given = _overrides(argv[1:])
    argv = list(argv)
    if "output.dir" in given:
        folder = Path(given["output.dir"])
    elif run_dir:
        folder = Path(run_dir)
    else:  # a fresh folder under the command's default: two launches never share one
        root = Path(cfg["output"]["dir"]) if cfg and "output" in cfg else Path("runs") / argv[0]
        folder = root / time.strftime("%Y%m%d-%H%M%S")
    folder = folder.resolve()
    if cfg is not None and "output" in cfg:
        argv = [a for a in argv if not a.startswith("output.dir=")] + [f"output.dir={folder}"]
    resumable = cfg is not None and "resume" in cfg
    if resumable and "resume" not in given:
        argv.append("resume=auto")
    return PreparedRun(argv, folder, resumable)


def launch(run: PreparedRun, options: SchedulerOptions, dry_run: bool = False) -> str | None:
    """Submit ``run`` (or print what would be submitted); returns the job id."""
    name = options.name or f"mimscale-{run.argv[0]}"
    executor = build_executor(run.run_dir / "submitit", options, name)
    if dry_run:
        print(sbatch_script(executor), end="")
        print(f"# every task runs: mimscale {' '.join(run.argv)}\n# run folder: {run.run_dir}\n"
              f"# {python_on_path_note()}")
        return None
    run.run_dir.mkdir(parents=True, exist_ok=True)
    with cancellable_local_jobs():
        job = executor.submit(CommandJob(run.argv, run.run_dir))
    RunBook(run.run_dir).record("submitted", job_id=job.job_id, cluster=options.cluster)
    write_launch_record(run.run_dir, run.argv, options)
    print(f"submitted job {job.job_id} ({options.cluster}: {options.nodes} node(s) x {options.tasks} task(s))\n"
          f"run folder: {run.run_dir}\nfollow it with: mimscale status {run.run_dir}")
    return job.job_id


def write_launch_record(run_dir: Path, argv: list[str], options: SchedulerOptions) -> None:
    import sys

    record = {"argv": argv, "scheduler": asdict(options), "python": sys.executable,
              "submitit_folder": str(run_dir / "submitit")}
    tmp = run_dir / "launch.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(run_dir / "launch.json")
