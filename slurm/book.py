"""A run folder's job history: which jobs ran it, how often it was requeued, how it ended.

``<run>/jobs.jsonl`` gets one line per event, written by the launcher (``submitted``) and by rank 0
of the job (``started``, ``requeued``, ``done``, ``failed``, ``stopped``). Lines are appended whole
(one ``write``), so a reader never sees half an event; ``mimscale status`` reads them back.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

EVENTS = ("submitted", "started", "requeued", "done", "failed", "stopped")
ENDINGS = ("done", "failed", "stopped")


class RunBook:
    FILE = "jobs.jsonl"

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / self.FILE

    def record(self, event: str, **fields) -> dict:
        if event not in EVENTS:
            raise ValueError(f"unknown job event {event!r}; valid: {', '.join(EVENTS)}")
        entry = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return entry

    def events(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash of the writer's node: the rest still counts
        return out

    def job_ids(self) -> list[str]:
        """Every job id that ran (or was submitted for) this folder, oldest first."""
        seen: list[str] = []
        for e in self.events():
            job = e.get("job_id")
            if job and job not in seen:
                seen.append(job)
        return seen

    def requeues(self) -> int:
        """Times a job went back to the queue: submitit's requeues (recorded) and the scheduler's
        own (SLURM's PreemptMode=REQUEUE restarts the same job id without asking the job)."""
        events = self.events()
        total = 0
        for job in self.job_ids():
            recorded = sum(e["event"] == "requeued" and e.get("job_id") == job for e in events)
            restarts = sum(e["event"] == "started" and e.get("job_id") == job for e in events) - 1
            total += max(recorded, restarts)
        return total

    def attempts(self, job_id: str) -> int:
        return sum(e["event"] == "started" and e.get("job_id") == job_id for e in self.events())

    def last(self, *events: str) -> dict | None:
        for e in reversed(self.events()):
            if not events or e["event"] in events:
                return e
        return None

    def finished(self) -> bool:
        last = self.last()
        return last is not None and last["event"] == "done"
