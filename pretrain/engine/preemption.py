"""Preemption: a signal asks for a checkpoint at the next step boundary and a clean exit.

The handler only records the signal; the train loop acts on it between steps, where the state is
consistent. Ranks receive signals at different moments (or only some do), so the loop asks all
ranks at every boundary and stops together (``Backend.any_rank``). Which signals count is
configurable because NCCL and some launchers use SIGUSR1 themselves.
"""

from __future__ import annotations

import signal
import threading
import warnings


def signal_number(name: str) -> signal.Signals:
    """``"USR1"`` or ``"SIGUSR1"`` -> ``signal.SIGUSR1``."""
    full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    try:
        return signal.Signals[full]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}; valid e.g. SIGUSR1, SIGUSR2, SIGTERM") from None


class PreemptionHandler:
    """Records the first of ``signals`` that arrives; restores the previous handlers on close.

    ``last_received`` (process-wide) keeps the signal after the handler is gone, so a launcher that
    ran a command in this process can tell that it stopped early (``mimscale.slurm.job`` requeues).
    """

    last_received: str | None = None

    def __init__(self, signals: list[str]):
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}
        numbers = [signal_number(s) for s in signals]
        if numbers and threading.current_thread() is not threading.main_thread():
            warnings.warn("not in the main thread: preemption signals are not handled", stacklevel=2)
            return
        for num in numbers:
            self._previous[num] = signal.signal(num, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            PreemptionHandler.last_received = self.received

    @property
    def requested(self) -> bool:
        return self.received is not None

    def close(self) -> None:
        for num, previous in self._previous.items():
            signal.signal(num, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
