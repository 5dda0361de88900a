"""Scheduler options -> a submitit executor (SLURM or local), and the sbatch script it would submit.

One task per GPU: ``--gpus-per-node G`` gives G tasks per node, each joining torch.distributed
(``job.py``). Without GPUs ``--tasks-per-node`` says how many CPU processes (gloo) to start.
Preemption and the time limit arrive as submitit's signal (SIGUSR2) ``--signal-delay`` seconds
before the kill; ``job.py`` checkpoints at the next step boundary and requeues.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mimscale.config import ConfigError

CLUSTERS = ("slurm", "local")


@dataclass
class SchedulerOptions:
    cluster: str = "slurm"
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one per GPU, else 1
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str = "24:00:00"
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None
    exclude: str | None = None
    comment: str | None = None
    mail: str | None = None
    mail_type: str = "END,FAIL"
    setup: list[str] = field(default_factory=list)
    signal_delay: int = 120
    max_timeouts: int = 100
    array_parallelism: int = 64
    name: str | None = None

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def timeout_min(self) -> int:
        return time_to_minutes(self.time)


def time_to_minutes(text: str) -> int:
    """SLURM's time formats: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not match:
        raise ConfigError(f"--time {text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        h, m, s = int(a), int(b or 0), int(c or 0)
        total = int(days) * 1440 + h * 60 + m + s / 60
    elif c is not None:  # HH:MM:SS
        total = int(a) * 60 + int(b) + int(c) / 60
    elif b is not None:  # MM:SS
        total = int(a) + int(b) / 60
    else:
        total = int(a)
    if total < 1:
        raise ConfigError(f"--time {text!r} is under a minute")
    return int(-(-total // 1))  # whole minutes, rounded up


def add_scheduler_arguments(parser: argparse.ArgumentParser, *, array: bool = False) -> None:
    g = parser.add_argument_group("scheduler")
    g.add_argument("--cluster", choices=CLUSTERS, default="slurm",
                   help="slurm (sbatch) or local (the same job path in local processes, for testing)")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task per GPU")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node (default: one per GPU, else 1)")
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--partition", default=None)
    g.add_argument("--time", default="24:00:00", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS (default 24:00:00)")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--mem", default=None, help="memory per node as SLURM takes it, e.g. 480G")
    g.add_argument("--exclude", default=None, help="nodes to avoid, e.g. node[01-03]")
    g.add_argument("--comment", default=None)
    g.add_argument("--mail", default=None, metavar="ADDRESS", help="mail this address (see --mail-type)")
    g.add_argument("--mail-type", default="END,FAIL", help="when to mail (default END,FAIL)")
    g.add_argument("--setup", action="append", default=[], metavar="CMD",
                   help="a shell line run before the job (e.g. 'module load cuda'); repeatable")
    g.add_argument("--signal-delay", type=int, default=120, metavar="S",
                   help="seconds between the preemption/time-limit signal and the kill (default 120)")
    g.add_argument("--max-timeouts", type=int, default=100,
                   help="requeues after reaching the time limit before giving up (preemptions do not count)")
    g.add_argument("--name", default=None, help="job name (default mimscale-<command>)")
    g.add_argument("--dry-run", action="store_true", help="print what would be submitted and exit")
    if array:
        g.add_argument("--array-parallelism", type=int, default=64,
                       help="elements of the job array running at once (default 64)")


def options_from_args(args: argparse.Namespace) -> SchedulerOptions:
    values = {k: getattr(args, k) for k in SchedulerOptions.__dataclass_fields__ if hasattr(args, k)}
    options = SchedulerOptions(**values)
    for key in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "array_parallelism", "max_timeouts"):
        value = getattr(options, key)
        if value is not None and value < (0 if key in ("gpus_per_node", "max_timeouts") else 1):
            raise ConfigError(f"--{key.replace('_', '-')} {value} is not valid")
    options.timeout_min  # noqa: B018 (validates --time)
    if options.cluster == "local" and options.nodes != 1:
        raise ConfigError("--cluster local runs on this machine: --nodes must be 1")
    return options


def executor_parameters(options: SchedulerOptions, name: str) -> dict:
    """submitit ``AutoExecutor`` parameters (the ``slurm_`` ones are ignored by the local executor)."""
    params = {
        "name": options.name or name,
        "nodes": options.nodes,
        "tasks_per_node": options.tasks,
        "gpus_per_node": options.gpus_per_node or None,
        "cpus_per_task": options.cpus_per_task,
        "timeout_min": options.timeout_min,
        "slurm_signal_delay_s": options.signal_delay,
        "slurm_partition": options.partition,
        "slurm_account": options.account,
        "slurm_qos": options.qos,
        "slurm_constraint": options.constraint,
        "slurm_mem": options.mem,
        "slurm_exclude": options.exclude,
        "slurm_comment": options.comment,
        "slurm_mail_user": options.mail,
        "slurm_mail_type": options.mail_type if options.mail else None,
        "slurm_setup": options.setup or None,
        "slurm_array_parallelism": options.array_parallelism,
        # scontrol requeue needs a requeueable job, whatever the cluster's default
        "slurm_additional_parameters": {"requeue": True},
    }
    if options.cluster == "local" and options.setup:
        params["local_setup"] = options.setup
    return {k: v for k, v in params.items() if v is not None}


def build_executor(folder: Path, options: SchedulerOptions, name: str):
    import submitit

    if options.cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise ConfigError("--cluster slurm needs SLURM's sbatch and srun on PATH (run it on a login "
                          "node); --cluster local runs the same job path on this machine")
    executor = submitit.AutoExecutor(folder=folder, cluster=options.cluster,
                                     slurm_max_num_timeout=options.max_timeouts,
                                     local_max_num_timeout=options.max_timeouts)
    executor.update_parameters(**executor_parameters(options, name))
    if options.cluster == "local":  # not an AutoExecutor parameter, but the local controller honours it
        executor._executor.update_parameters(signal_delay_s=options.signal_delay)
    return executor


@contextlib.contextmanager
def cancellable_local_jobs():
    """Submit with SIGINT at its default. A local job's controller stops its tasks on SIGINT (how
    ``mimscale status --cancel`` cancels it), but a process started with SIGINT ignored (a script's
    background job, nohup) passes that on to the controller it spawns, which then could never be
    cancelled and would leave its tasks running."""
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def sbatch_script(executor, array_size: int | None = None) -> str:
    """The sbatch file submitit writes for this executor (``--dry-run`` prints it)."""
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    inner = executor._executor
    if not isinstance(inner, SlurmExecutor):
        return (f"# --cluster local: {inner.parameters.get('tasks_per_node', 1)} local process(es) "
                f"through submitit's LocalExecutor, no sbatch script\n")
    params = dict(inner.parameters)
    if array_size:
        params["map_count"] = array_size
    return _make_sbatch_string(command=inner._submitit_command_str, folder=inner.folder, **params)


def python_on_path_note() -> str:
    return f"jobs run {sys.executable} (it must exist at the same path on the compute nodes)"
