"""``mimscale status``: the state of a launched run or of every element of a sweep.

A run's own history (``jobs.jsonl``) says how it ended when it could say so (done, failed with the
error, stopped by a signal); while it has not ended, the scheduler says whether its newest job is
queued or running (``sacct``, else ``squeue``; for ``--cluster local`` whether the job's controller
process is alive). A job the scheduler lists as ended without a record (cancelled, out of memory,
node failure, killed) is failed, with the last error line of its log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .book import RunBook

QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


@dataclass
class RunState:
    name: str
    state: str          # new | queued | running | done | failed | stopped
    requeues: int
    job_ids: list[str]
    detail: str = ""    # the error line of a failed run, the signal of a stopped one

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")


def scheduler_state(cluster: str, job_id: str) -> str | None:
    """The scheduler's word on one job (SLURM state names; ``GONE`` for a local job whose
    processes have ended), or None when it cannot tell."""
    if cluster == "local":
        return "RUNNING" if _process_alive(job_id) else "GONE"
    for cmd in (["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State"],
                ["squeue", "-h", "-j", job_id, "-o", "%i|%T"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode:
            continue
        for line in out.stdout.splitlines():
            jid, _, state = line.strip().partition("|")
            if jid == job_id and state:
                return state.split()[0].upper()  # "CANCELLED by 1234" -> CANCELLED
    return None


def _process_alive(pid: str) -> bool:
    """True if ``pid`` is a live (not zombie) process: a local job's id is its controller's pid."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel directly
        try:
            os.kill(int(pid), 0)
            return True
        except OSError:
            return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # zombie / dead


def last_error_line(log: str | None) -> str:
    if not log or not Path(log).is_file():
        return ""
    lines = [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line or "error:" in line.lower():
            return line
    return lines[-1] if lines else ""


def run_state(run_dir: str | Path, name: str | None = None) -> RunState:
    book = RunBook(run_dir)
    events = book.events()
    name = name or Path(run_dir).name
    if not events:
        return RunState(name, "new", 0, [], "not submitted yet")
    last, jobs, requeues = events[-1], book.job_ids(), book.requeues()
    if last["event"] == "done":
        return RunState(name, "done", requeues, jobs)
    if last["event"] == "failed":
        return RunState(name, "failed", requeues, jobs, last.get("error", ""))
    if last["event"] == "stopped":
        return RunState(name, "stopped", requeues, jobs, f"stopped by {last.get('signal')}; re-submit to continue")
    submitted = book.last("submitted") or {}
    sched = scheduler_state(submitted.get("cluster", "slurm"), last["job_id"])
    if sched in QUEUED or (sched is None and last["event"] in ("submitted", "requeued")):
        return RunState(name, "queued", requeues, jobs)
    if sched in RUNNING or sched is None:
        return RunState(name, "running", requeues, jobs)
    started = book.last("started") or {}
    reason = "its processes ended without a record (killed?)" if sched == "GONE" else f"scheduler state {sched}"
    error = last_error_line(started.get("log")) if started.get("job_id") == last["job_id"] else ""
    return RunState(name, "failed", requeues, jobs, f"{reason}{': ' + error if error else ''}")


def cancel(folder: str | Path) -> list[str]:
    """Cancel the queued or running job of every element (``scancel``; a local job's controller is
    interrupted, which stops its tasks). Returns the cancelled job ids."""
    cancelled = []
    for state, run_dir in _states_and_dirs(Path(folder)):
        if not state.active:
            continue
        job = state.job_ids[-1]
        cluster = (RunBook(run_dir).last("submitted") or {}).get("cluster", "slurm")
        if cluster == "local":
            os.kill(int(job), signal.SIGINT)
        else:
            subprocess.run(["scancel", job], check=True, timeout=60)
        cancelled.append(job)
    return cancelled


def sweep_elements(sweep_dir: Path) -> list[tuple[str, Path]]:
    record = json.loads((sweep_dir / "sweep.json").read_text())
    return [(e["name"], Path(e["run_dir"])) for e in record["elements"]]


def folder_states(folder: str | Path) -> list[RunState]:
    return [state for state, _ in _states_and_dirs(Path(folder))]


def _states_and_dirs(folder: Path) -> list[tuple[RunState, Path]]:
    if (folder / "sweep.json").is_file():
        return [(run_state(d, n), d) for n, d in sweep_elements(folder)]
    if (folder / RunBook.FILE).is_file():
        return [(run_state(folder), folder)]
    raise FileNotFoundError(f"{folder} is neither a launched run (no {RunBook.FILE}) nor a sweep "
                            "(no sweep.json): give the folder mimscale launch / sweep printed")


def format_states(states: list[RunState]) -> str:
    rows = [("element", "state", "requeued", "jobs", "detail")]
    for s in states:
        rows.append((s.name, s.state, f"{s.requeues}x", ",".join(s.job_ids[-3:]), s.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r[:4], widths)) + ("  " + r[4] if r[4] else "") for r in rows]
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return "\n".join(lines)
