"""One ``mimscale`` command run as a submitit job, requeued with ``resume=auto`` when preempted.

Every task of the job runs the same command in-process after exporting torch.distributed's
variables from submitit's ``JobEnvironment``, so the command joins the process group exactly as
under torchrun (NCCL on GPUs, gloo on CPUs: ``init_distributed`` decides).

Preemption and the time limit arrive as submitit's signal (SIGUSR2). The commands that checkpoint
(``pretrain`` and the downstream trainers) take that signal over while they run: every rank
finishes its step, the engine writes an atomic checkpoint and the command returns. Only then is
the signal handed back to submitit's own handler, which calls ``checkpoint`` below (a fresh job
with the same arguments: the arguments already say ``resume=auto``) and requeues the job. Should
the signal arrive while no command holds it (start-up), submitit requeues at once and the job
resumes from the last complete checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import traceback
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable

from .book import RunBook


class CommandJob(Checkpointable):
    def __init__(self, argv: list[str], run_dir: str | os.PathLike):
        self.argv = list(argv)
        self.run_dir = str(Path(run_dir).resolve())

    def __call__(self) -> int:
        from mimscale.cli import dispatch
        from mimscale.pretrain.engine.backend import leave_process_group
        from mimscale.pretrain.engine.preemption import PreemptionHandler

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                  overwrite=True)
        main = env.global_rank == 0
        book = RunBook(self.run_dir)
        if main:
            book.record("started", job_id=env.job_id, attempt=book.attempts(env.job_id) + 1,
                        hosts=list(env.hostnames), tasks=env.num_tasks, host=socket.gethostname(),
                        log=str(env.paths.stderr))
        PreemptionHandler.last_received = None
        try:
            code = dispatch(self.argv)
        except BaseException as e:  # SystemExit too: argparse errors end that way
            # submitit requeueing from inside the command (a signal no train loop held) exits too
            requeued = isinstance(e, SystemExit) and (book.last() or {}).get("event") == "requeued"
            if main and not requeued and not (isinstance(e, SystemExit) and e.code in (0, None)):
                book.record("failed", job_id=env.job_id, error=_last_line(e))
            leave_process_group(together=False)  # the other ranks may never get here
            raise
        leave_process_group(together=True)
        stopped_by = PreemptionHandler.last_received
        if stopped_by is not None and signal.Signals[stopped_by] == env._usr_sig():
            _hand_signal_to_submitit(env._usr_sig())  # rank 0: requeues and exits; others return
            return code
        if main:
            if code:
                book.record("failed", job_id=env.job_id, error=f"exit status {code}")
            elif stopped_by is not None:
                book.record("stopped", job_id=env.job_id, signal=stopped_by)
            else:
                book.record("done", job_id=env.job_id)
        if code:
            raise RuntimeError(f"mimscale {' '.join(self.argv[:1])} exited with status {code}")
        return code

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 when the job is preempted or times out: requeue the same
        command (it resumes from its newest complete checkpoint)."""
        env = submitit.JobEnvironment()
        RunBook(self.run_dir).record("requeued", job_id=env.job_id)
        return submitit.helpers.DelayedSubmission(CommandJob(self.argv, self.run_dir))


def _hand_signal_to_submitit(signum: signal.Signals) -> None:
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)


def _last_line(error: BaseException) -> str:
    lines = traceback.format_exception_only(type(error), error)
    return lines[-1].strip() if lines else repr(error)
