"""The job path end to end through submitit's local executor: real job processes (2 ranks joined
by gloo from submitit's JobEnvironment), real checkpoints, submitit's own requeue logic.

Preemption is delivered as the local controller delivers it at the time limit (and SLURM with
``--signal``): SIGUSR2 to every task of the job.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from pathlib import Path

import pytest

from mimscale.cli import main
from mimscale.slurm.book import RunBook
from mimscale.slurm.status import run_state

pytestmark = pytest.mark.slow


def _tiny(data: Path, steps: int) -> list[str]:
    return ["model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8",
            "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
            "data.source=synthetic", f"data.root={data}", "data.synthetic_images=48",
            "data.synthetic_size=40", "data.batch_size=8", "data.num_workers=0", "optim.blr=1e-3",
            "schedule.warmup_steps=2", "engine.precision=fp32", "engine.threads=1", "logging.log_every=1",
            "logging.image_every=0", "logging.progress=off", "logging.tensorboard=false",
            f"schedule.max_steps={steps}"]


def _tasks(job_id: str) -> list[int]:
    """The task processes of a local job (children of its controller, whose pid is the job id)."""
    try:
        return [int(p) for p in Path(f"/proc/{job_id}/task/{job_id}/children").read_text().split()]
    except OSError:
        return []


def _wait(condition, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _losses(run: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert out.get(r["step"], r["loss"]) == r["loss"], "a step logged twice must agree"
        out[r["step"]] = r["loss"]
    return out


def _ended(run: Path) -> bool:
    return run_state(run).state not in ("queued", "running")


def test_preempted_job_checkpoints_requeues_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    steps, data = 50, tmp_path / "data"
    preempted, reference = tmp_path / "preempted", tmp_path / "reference"
    for run in (preempted, reference):
        assert main(["launch", "pretrain", *_tiny(data, steps), "output.checkpoint_every=1000",
                     f"output.dir={run}", "--cluster", "local", "--tasks-per-node", "2"]) == 0
        if run == preempted:  # the second job starts while the first runs
            job = RunBook(run).job_ids()[0]
            _wait(lambda run=run: _logged_steps(run) >= 5, "the first steps")
            tasks = _tasks(job)
            assert len(tasks) == 2
            for pid in tasks:
                os.kill(pid, signal.SIGUSR2)
    for run in (preempted, reference):
        _wait(lambda run=run: _ended(run), f"{run.name} to finish")

    state = run_state(preempted)
    assert (state.state, state.requeues) == ("done", 1), state
    events = [e["event"] for e in RunBook(preempted).events()]
    assert events == ["submitted", "started", "requeued", "started", "done"]
    starts = [e for e in RunBook(preempted).events() if e["event"] == "started"]
    assert [e["attempt"] for e in starts] == [1, 2] and all(e["tasks"] == 2 for e in starts)
    # the requeued job resumed from the checkpoint written at the preemption, not from step 0
    checkpoints = sorted(p.name for p in (preempted / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and checkpoints[-1] == f"step_{steps:08d}"
    stopped_at = int(checkpoints[0].split("_")[1])
    assert 5 <= stopped_at < steps
    log = (preempted / "submitit" / f"{RunBook(preempted).job_ids()[0]}_0_log.out").read_text()
    assert f"resumed at step {stopped_at}" in log  # both attempts append to rank 0's log

    assert run_state(reference).state == "done" and run_state(reference).requeues == 0
    got, want = _losses(preempted), _losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


SWEEP = """\
    vars: {{out: {out}}}
    common: {common}
    jobs:
      - name: ratio
        command: pretrain
        grid: {{masking.ratio: [0.5, 0.6, 0.75]}}
"""


def test_sweep_element_killed_then_resubmitted_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out, steps = tmp_path / "sweep", 40
    common = _tiny(tmp_path / "data", steps) + ["output.checkpoint_every=5"]
    file = tmp_path / "ratios.yaml"
    file.write_text(textwrap.dedent(SWEEP.format(out=out, common=json.dumps(common))))
    names = ["ratio_0.5", "ratio_0.6", "ratio_0.75"]

    assert main(["sweep", str(file), "--cluster", "local"]) == 0
    victim = out / names[2]
    job = RunBook(victim).job_ids()[0]
    _wait(lambda: (victim / "checkpoints" / "step_00000005").is_dir(), "the victim's first checkpoint")
    for pid in _tasks(job):  # no chance to record anything: as a node failure or kill -9 would
        os.kill(pid, signal.SIGKILL)
    for name in names:
        _wait(lambda name=name: _ended(out / name), f"{name} to end")
    capsys.readouterr()
    assert main(["status", str(out)]) == 1
    table = capsys.readouterr().out
    assert "killed?" in table
    assert [run_state(out / n).state for n in names] == ["done", "done", "failed"]

    assert main(["sweep", str(file), "--cluster", "local"]) == 0
    listing = capsys.readouterr().out
    assert "1 to submit" in listing
    _wait(lambda: _ended(victim), "the resubmitted element")
    assert [run_state(out / n).state for n in names] == ["done"] * 3
    assert [len(RunBook(out / n).job_ids()) for n in names] == [1, 1, 2]
    assert sorted(_losses(victim)) == list(range(1, steps + 1))
    record = json.loads((out / "sweep.json").read_text())
    assert [len(s["job_ids"]) for s in record["submissions"]] == [3, 1]


def test_a_signal_no_train_loop_holds_requeues_through_submitit(tmp_path, monkeypatch):
    """A command without step-boundary checkpoints (here a benchmark) leaves the signal to
    submitit's own handler, which requeues at once; the history shows a requeue, not a failure.
    Launched with SIGINT ignored (as in a script's background job), the job can still be cancelled."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "bench"
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(["launch", "bench", "masking", "--model", "mae_vit_tiny_patch16", "--img-size", "32",
                     "--batch", "2", "--rounds", "400", "--run-dir", str(run), "--cluster", "local"]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the launcher put it back
    finally:
        signal.signal(signal.SIGINT, before)
    job = RunBook(run).job_ids()[0]
    _wait(lambda: RunBook(run).last("started") is not None and len(_tasks(job)) == 1, "the job to start")
    time.sleep(3)  # into the benchmark
    os.kill(_tasks(job)[0], signal.SIGUSR2)
    _wait(lambda: RunBook(run).attempts(job) == 2, "the requeued job to start")
    os.kill(int(job), signal.SIGINT)  # cancel (as scancel would): the controller stops its task
    _wait(lambda: _ended(run), "the cancelled job to end")
    events = [e["event"] for e in RunBook(run).events()]
    assert events[:4] == ["submitted", "started", "requeued", "started"], events
    assert run_state(run).requeues == 1
