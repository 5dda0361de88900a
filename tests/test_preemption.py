"""Preemption and crashes: a signal checkpoints at the next step boundary and exits cleanly; a
SIGKILL in the middle of a checkpoint write leaves the previous checkpoint to resume from; either
way the continued run equals one that was never stopped.

The 2-rank tests launch real ``torchrun`` jobs (the CLI for resuming), signal or kill real worker
processes, and compare the JSONL metrics of the runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from distributed_utils import (
    free_port,
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_overrides,
)

from mimscale.pretrain.engine.checkpoint import CheckpointManager, load_checkpoint
from mimscale.pretrain.engine.preemption import PreemptionHandler
from mimscale.pretrain.engine.trainer import Trainer


def _losses(metrics: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (before a crash and after the resume) must agree."""
    out: dict[int, list[float]] = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r["step"], []).append(r["loss"])
    return out


def test_handler_records_the_signal_and_restores_the_previous_one():
    before = signal.getsignal(signal.SIGUSR2)
    with PreemptionHandler(["USR2", "SIGTERM"]) as handler:
        assert not handler.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.01)
        assert handler.requested and handler.received == "SIGUSR2"
    assert signal.getsignal(signal.SIGUSR2) is before
    with PreemptionHandler([]) as handler:  # none configured: nothing is installed
        assert signal.getsignal(signal.SIGUSR2) is before


def test_signal_checkpoints_at_the_step_boundary_and_resume_continues_exactly(tiny_config, tmp_path, monkeypatch):
    """One process: SIGUSR2 arrives during step 3; the run checkpoints step 3 and stops."""
    extra = ["schedule.max_steps=6", "output.checkpoint_every=100", "teacher.type=ema",
             "engine.preempt_signals=[SIGUSR2]"]
    full = Trainer(tiny_config(*extra, f"output.dir={tmp_path / 'full'}")).fit()

    trainer = Trainer(tiny_config(*extra, f"output.dir={tmp_path / 'stopped'}"))
    method = trainer.method
    real_forward = type(method).forward

    def forward(self, images, generator, *views):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGUSR2)  # mid-step: acted on at the boundary
        return real_forward(self, images, generator, *views)

    monkeypatch.setattr(type(method), "forward", forward)
    stopped = trainer.fit()
    monkeypatch.undo()
    assert stopped.preempted == "SIGUSR2" and stopped.steps == 3
    assert [s for s, _ in CheckpointManager(tmp_path / "stopped" / "checkpoints").complete()] == [3]

    resumed = Trainer(tiny_config(*extra, f"output.dir={tmp_path / 'stopped'}", "resume=auto"))
    assert resumed.step == 3
    rest = resumed.fit()
    assert rest.preempted is None and [s for s, _ in rest.losses] == [4, 5, 6]
    expected = dict(full.losses)
    for step, loss in stopped.losses + rest.losses:
        assert loss == pytest.approx(expected[step], abs=1e-6)
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(rest.checkpoint)
    for part in ("model", "method"):
        for k, v in a[part].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(b[part][k], v, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- 2 ranks, torchrun

def _torchrun(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _processes(parent: int) -> dict[int, list[bytes]]:
    """pid -> environment of each child of ``parent`` (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent:
                found[int(entry.name)] = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
    return found


def _worker_pid(launcher: int, rank: int) -> int:
    for pid, environ in _processes(launcher).items():
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank} under pid {launcher}")


def _kill(job: subprocess.Popen) -> str:
    """SIGKILL the launcher and its workers (torchrun gives each its own session) at once."""
    for pid in [*_processes(job.pid), job.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return job.communicate()[0]


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"torchrun did not finish in {timeout}s:\n{_kill(proc)[-3000:]}") from None
    return proc.returncode, out


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended early:\n{_kill(proc)[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for the job:\n{_kill(proc)[-3000:]}")
        time.sleep(0.02)


def _logged_step(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    lines = metrics.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


TWO_RUNS = textwrap.dedent("""
    # the reference run to the end, then the same run again, to be signalled from outside
    import sys
    from mimscale.config import load_config
    from mimscale.pretrain.engine.trainer import Trainer
    reference, signalled, *overrides = sys.argv[1:]
    Trainer(load_config(overrides + [f"output.dir={reference}"])).fit()
    summary = Trainer(load_config(overrides + [f"output.dir={signalled}"])).fit()
    print(f"RESULT preempted={summary.preempted} steps={summary.steps}", flush=True)
    # as `mimscale pretrain` ends: every rank leaves the group together (a rank exiting with a live
    # gloo group while the other still uses it can abort in gloo's threads)
    from mimscale.pretrain.engine.backend import leave_process_group
    leave_process_group(together=True)
""")


@pytest.mark.slow
def test_sigterm_on_one_rank_checkpoints_both_and_resume_continues_exactly(tmp_path):
    steps = 12
    # IDM+PLB: each rank's per-head loss sums (rank-local state) feed the epoch-end update at step 7
    overrides = tiny_overrides(tmp_path / "unused", tmp_path / "data") + [
        "data.batch_size=4", f"schedule.max_steps={steps}", "output.checkpoint_every=100", "teacher.type=ema",
        "masking.strategy=idm"]
    script = tmp_path / "two_runs.py"
    script.write_text(TWO_RUNS)
    reference, run = tmp_path / "reference", tmp_path / "run"
    job = _torchrun([str(script), str(reference), str(run), *overrides])
    _wait_for(lambda: _logged_step(run / "metrics.jsonl") >= 2, job)
    os.kill(_worker_pid(job.pid, 1), signal.SIGTERM)  # as SLURM or torchrun would, to one rank only
    code, out = _finish(job)
    assert code == 0, out[-3000:]  # a clean exit: every rank stopped at the same boundary
    stopped_at = _logged_step(run / "metrics.jsonl")
    assert 2 <= stopped_at < steps and out.count("RESULT preempted=") == 2
    assert f"RESULT preempted=SIGTERM steps={stopped_at}" in out  # rank 1 saw the signal
    assert "RESULT preempted=a signal on another rank" in out or out.count("preempted=SIGTERM") == 2
    assert [s for s, _ in CheckpointManager(run / "checkpoints").complete()] == [stopped_at]

    code, out = _finish(_torchrun(["-m", "mimscale", "pretrain", *overrides, f"output.dir={run}",
                                   "resume=auto"]))
    assert code == 0, out[-3000:]
    assert f"resumed at step {stopped_at}" in out
    assert out.count("done: ") == 1 and f"(resumed at step {stopped_at})" in out  # rank 0's last line
    plb = [json.loads(line)["plb_p_0"] for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert plb[5] == pytest.approx(1 / 3) and plb[6] != pytest.approx(1 / 3)  # PLB moved after epoch 1
    expected, got = _losses(reference / "metrics.jsonl"), _losses(run / "metrics.jsonl")
    assert sorted(got) == list(range(1, steps + 1))
    for step, losses in got.items():
        assert losses == pytest.approx([expected[step][0]] * len(losses), abs=1e-6)
    a = load_checkpoint(reference / "checkpoints" / f"step_{steps:08d}")
    b = load_checkpoint(run / "checkpoints" / f"step_{steps:08d}")
    for part in ("model", "method"):
        for k, v in a[part].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(b[part][k], v, rtol=0, atol=1e-6)


KILLED_WRITE = textwrap.dedent("""
    # an fsdp run whose step-4 checkpoint write stalls half-way through state.pt (every rank's
    # shards already written, no marker yet), where it is SIGKILLed from outside
    import sys, time
    from mimscale.config import load_config
    from mimscale.pretrain.engine import checkpoint
    from mimscale.pretrain.engine.trainer import Trainer
    real_write = checkpoint._write_file
    def stalling_write(path, write):
        if path.name == checkpoint.STATE_FILE and "step_00000004" in str(path.parent):
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
                f.flush()
            time.sleep(600)
        real_write(path, write)
    checkpoint._write_file = stalling_write
    Trainer(load_config(sys.argv[1:])).fit()
""")


@pytest.mark.slow
def test_sigkill_during_a_sharded_checkpoint_write_resumes_from_the_previous_one(tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(run, tmp_path / "data") + [
        "engine.backend=fsdp", "data.batch_size=4", "schedule.max_steps=4", "output.checkpoint_every=2"]
    script = tmp_path / "killed_write.py"
    script.write_text(KILLED_WRITE)
    job = _torchrun([str(script), *overrides])
    staging = run / "checkpoints" / ".tmp-step_00000004"
    _wait_for(lambda: (staging / "state.pt").is_file() and (staging / "dcp" / ".metadata").is_file(), job)
    _kill(job)  # every process of the job dies mid-write, as on a node failure

    manager = CheckpointManager(run / "checkpoints")
    assert [s for s, _ in manager.complete()] == [2]  # the interrupted one is not a checkpoint
    assert load_checkpoint(manager.latest())["step"] == 2
    before = _losses(run / "metrics.jsonl")
    assert sorted(before) == [1, 2, 3, 4]  # steps 3 and 4 ran before the kill

    code, out = _finish(_torchrun(["-m", "mimscale", "pretrain", *overrides, "resume=auto"]))
    assert code == 0, out[-3000:]
    assert "resumed at step 2" in out
    after = _losses(run / "metrics.jsonl")
    for step in (3, 4):  # logged by the killed run and again by the resumed one: identical
        assert len(after[step]) == 2 and after[step][1] == pytest.approx(after[step][0], abs=1e-6)
    assert [s for s, _ in manager.complete()] == [2, 4] and not staging.exists()
