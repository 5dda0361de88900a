"""``mimscale sweep``: every element of a sweep file as one job array, one run folder per element.

The file format is ``mimscale.downstream.sweeps``' (base command + overrides, grids); element
``name`` runs in ``{out}/{name}``. ``{out}/sweep.json`` lists the elements and every submission.
Submitting again skips elements that are done or still queued/running and resubmits the others,
which continue from their newest checkpoint (``resume=auto``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mimscale.config import ConfigError
from mimscale.downstream.sweeps import expand

from .book import RunBook
from .executor import (
    SchedulerOptions,
    build_executor,
    cancellable_local_jobs,
    python_on_path_note,
    sbatch_script,
)
from .job import CommandJob
from .launch import PreparedRun, prepare, write_launch_record
from .status import run_state


def plan_sweep(file: str, variables: dict[str, str]) -> tuple[Path, list[tuple[str, PreparedRun]]]:
    """The sweep folder and each element, validated (every element's config resolves) before
    anything is submitted."""
    elements = []
    for job in expand(file, variables):
        run = prepare(job.argv)
        elements.append((job.name, run))
    parents = {run.run_dir.parent for _, run in elements}
    if len(parents) != 1:
        raise ConfigError(f"sweep {file}: elements write to several folders {sorted(map(str, parents))}; "
                         "their output.dir must be {out}/{name}")
    return parents.pop(), elements


def submit_sweep(file: str, variables: dict[str, str], options: SchedulerOptions,
                 dry_run: bool = False) -> list[str]:
    """Submit the elements that still need to run as one array; returns their job ids."""
    sweep_dir, elements = plan_sweep(file, variables)
    name = options.name or f"mimscale-sweep-{sweep_dir.name}"
    todo, lines = [], []
    for name, run in elements:
        state = run_state(run.run_dir, name)
        skip = state.state == "done" or state.active
        lines.append(f"{name:<28} {state.state:<8} {'skip' if skip else 'submit'}  mimscale {' '.join(run.argv)}")
        if not skip:
            todo.append((name, run))
    print(f"sweep {file}: {len(elements)} element(s) in {sweep_dir}, {len(todo)} to submit")
    print("\n".join(lines))
    if dry_run or not todo:
        if dry_run and todo:
            executor = build_executor(sweep_dir / "submitit", options, name)
            print(sbatch_script(executor, array_size=len(todo)), end="")
            print(f"# {python_on_path_note()}")
        return []
    sweep_dir.mkdir(parents=True, exist_ok=True)
    executor = build_executor(sweep_dir / "submitit", options, name)
    with cancellable_local_jobs(), executor.batch():
        jobs = [executor.submit(CommandJob(run.argv, run.run_dir)) for _, run in todo]
    for (_, run), job in zip(todo, jobs):
        run.run_dir.mkdir(parents=True, exist_ok=True)
        RunBook(run.run_dir).record("submitted", job_id=job.job_id, cluster=options.cluster, sweep=str(sweep_dir))
        write_launch_record(run.run_dir, run.argv, options)
    _write_record(sweep_dir, file, variables, elements, [job.job_id for job in jobs])
    ids = [job.job_id for job in jobs]
    print(f"submitted {len(ids)} job(s): {', '.join(ids)}\nfollow them with: mimscale status {sweep_dir}")
    return ids


def _write_record(sweep_dir: Path, file: str, variables: dict, elements, job_ids: list[str]) -> None:
    path = sweep_dir / "sweep.json"
    record = json.loads(path.read_text()) if path.is_file() else {"submissions": []}
    record.update(file=str(Path(file).resolve()) if Path(file).is_file() else file, variables=variables,
                  elements=[{"name": n, "run_dir": str(r.run_dir), "argv": r.argv} for n, r in elements])
    record["submissions"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "job_ids": job_ids})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
