"""Running a study's steps: here, one after another, or as job arrays through the SLURM launcher.

Here, every step runs in this process (no interpreter start per step); a step that fails is
reported and the steps that do not need it still run. Through a scheduler, each job runs
``mimscale study FILE --out DIR --step NAME``, i.e. the same code on the compute node; the steps
whose inputs are ready are submitted as one array, and running the command again submits the next
wave (a step done, queued or running is never submitted twice).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback

from mimscale.errors import UserError

from . import Study
from .plan import RUN_MARKER, Step, data_root, plan

WALL_LOG = "study_wall.jsonl"
CALIBRATION = "study_budget.json"
CALIBRATION_STEPS = (3, 10)  # warm-up, timed: a time budget's step time is measured on the run's machine


def prepare_data(study: Study) -> None:
    """Generate the shapes set once (synthetic), or check the ImageFolder layout."""
    root = data_root(study)
    if study.data["dataset"] == "synthetic":
        from mimscale.downstream.classify.datasets import ensure_synthetic

        ensure_synthetic(root, int(study.data["train_images"]), int(study.data["val_images"]),
                         int(study.model.get("img_size", 224)))
        return
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"data.root {root}: no {split}/ folder (an ImageFolder with train/<class>/ and "
                            f"val/<class>/ is needed)")


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _time_budget_steps(study: Study, step: Step, argv: list[str]) -> int:
    """Steps that fit the run's time budget at its own measured step time (measured once, kept)."""
    path = step.out / CALIBRATION
    if path.is_file():
        return int(json.loads(path.read_text())["steps"])
    from mimscale.config import load_config
    from mimscale.pretrain.engine.bench_step import measure

    warmup, timed = CALIBRATION_STEPS
    overrides = [a for a in argv[1:] if not a.startswith(("output.dir=", "resume="))]
    cfg = load_config(overrides + [f"output.dir={step.out / 'calibration'}", "resume=none",
                                   "logging.tensorboard=false", "logging.progress=off", "logging.image_every=0",
                                   "engine.memory_report_steps=0", f"schedule.max_steps={warmup + timed}"])
    row = measure(cfg, warmup, timed, "loader")
    shutil.rmtree(step.out / "calibration", ignore_errors=True)  # only its time is kept
    steps = max(1, int(float(study.budget["seconds"]) * 1000 / row["step_ms"]))
    if _is_main():
        step.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"seconds": study.budget["seconds"], "step_ms": row["step_ms"], "steps": steps},
                                   indent=2) + "\n")
    return steps


def _pretrain(study: Study, step: Step) -> None:
    from mimscale.cli import dispatch
    from mimscale.config import load_config
    from mimscale.pretrain.engine.checkpoint import CheckpointManager
    from mimscale.pretrain.engine.flops import step_flops

    argv = list(step.argv)
    if study.budget["by"] == "time":
        argv.insert(len(argv) - 2, f"schedule.max_steps={_time_budget_steps(study, step, argv)}")
    start = time.perf_counter()
    code = dispatch(argv)
    wall = time.perf_counter() - start
    if code:
        raise RuntimeError(f"mimscale pretrain exited with status {code}")
    if not _is_main():
        return
    with open(step.out / WALL_LOG, "a") as f:  # one line per session: a resumed run adds up
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": wall}) + "\n")
    cfg = load_config([a for a in argv[1:] if a != "resume=auto"])
    done = CheckpointManager(step.out / "checkpoints").complete()
    if not done or done[-1][0] < cfg.schedule.max_steps:
        return  # stopped early (a signal): not done, the next run continues it
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps, flops = done[-1][0], step_flops(cfg, world_size=world)
    sessions = [json.loads(line) for line in (step.out / WALL_LOG).read_text().splitlines() if line.strip()]
    record = {"recipe": step.row, "seed": step.seed, "steps": steps, "batch": cfg.data.batch_size,
              "ranks": world, "images_seen": steps * cfg.data.batch_size * cfg.optim.accum_steps * world,
              "wall_s": sum(s["wall_s"] for s in sessions), "sessions": len(sessions),
              "flops_per_step": flops.per_step * world, "flops": flops.per_step * world * steps,
              "budget": study.budget["by"]}
    tmp = step.out / (RUN_MARKER + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(step.out / RUN_MARKER)


def run_step(study: Study, step: Step) -> None:
    """Run one step in this process (what a study job runs too)."""
    from mimscale.cli import dispatch

    if step.kind == "pretrain":
        _pretrain(study, step)
        return
    code = dispatch(step.argv)
    if code:
        raise RuntimeError(f"mimscale {step.argv[0]} exited with status {code}")


def run_here(study: Study, steps: list[Step], log=print) -> list[str]:
    """Run every step not done yet, in order; returns the names of the steps that failed or could
    not run (a step they need failed)."""
    by_name = {s.name: s for s in steps}
    todo = [s for s in steps if not s.done()]
    log(f"study {study.out}: {len(steps)} steps, {len(steps) - len(todo)} done, {len(todo)} to run")
    failed: list[str] = []
    for i, step in enumerate(todo, 1):
        blocked = [n for n in step.needs if not by_name[n].done()]
        if blocked:
            log(f"[{i}/{len(todo)}] {step.name}: skipped, needs {', '.join(blocked)}")
            failed.append(step.name)
            continue
        log(f"[{i}/{len(todo)}] {step.name}: mimscale {' '.join(step.argv)}")
        start = time.perf_counter()
        try:
            run_step(study, step)
        except Exception as e:  # one broken run must not cost the others
            if os.environ.get("MIMSCALE_DEBUG", "0") not in ("", "0"):
                traceback.print_exc()
            log(f"[{i}/{len(todo)}] {step.name}: FAILED: {type(e).__name__}: {e}")
            failed.append(step.name)
            continue
        took = f"{time.perf_counter() - start:.0f}s"
        if not step.done():  # a pretraining run stopped by a signal (it checkpointed): so does the study
            log(f"[{i}/{len(todo)}] {step.name}: stopped after {took}; run the study again to continue")
            return failed + [s.name for s in todo[i - 1:]]
        log(f"[{i}/{len(todo)}] {step.name}: done in {took}")
    return failed


def submit(study: Study, steps: list[Step], options, dry_run: bool = False) -> tuple[list[Step], list[Step]]:
    """Submit the steps whose inputs are done and that are neither done nor queued/running, as one
    job array; returns (submitted, still waiting on other steps)."""
    from mimscale.slurm.book import RunBook
    from mimscale.slurm.executor import build_executor, cancellable_local_jobs, sbatch_script
    from mimscale.slurm.job import CommandJob
    from mimscale.slurm.launch import write_launch_record
    from mimscale.slurm.status import run_state

    by_name = {s.name: s for s in steps}
    ready, waiting = [], []
    for step in steps:
        if step.done() or run_state(step.out, step.name).active:
            continue
        (ready if all(by_name[n].done() for n in step.needs) else waiting).append(step)
    print(f"study {study.out}: {len(steps)} steps, {sum(s.done() for s in steps)} done, {len(ready)} to submit, "
          f"{len(waiting)} waiting on others")
    argv_of = {s.name: ["study", study.file, "--out", str(study.out), "--step", s.name] for s in ready}
    name = options.name or f"mimscale-study-{study.out.name}"
    executor = build_executor(study.out / "submitit", options, name)
    if dry_run:
        for s in ready:
            print(f"{s.name:<28} mimscale {' '.join(argv_of[s.name])}")
        if ready:
            print(sbatch_script(executor, array_size=len(ready)), end="")
        return ready, waiting
    if not ready:
        return ready, waiting
    with cancellable_local_jobs(), executor.batch():
        jobs = [executor.submit(CommandJob(argv_of[s.name], s.out)) for s in ready]
    for s, job in zip(ready, jobs):
        RunBook(s.out).record("submitted", job_id=job.job_id, cluster=options.cluster, study=str(study.out))
        write_launch_record(s.out, argv_of[s.name], options)
    print(f"submitted {len(jobs)} job(s): {', '.join(j.job_id for j in jobs)}")
    return ready, waiting


def find_step(study: Study, name: str) -> Step:
    steps = {s.name: s for s in plan(study)}
    if name not in steps:
        raise UserError(f"--step {name!r} is not a step of {study.file}; e.g. {', '.join(list(steps)[:3])}")
    return steps[name]

