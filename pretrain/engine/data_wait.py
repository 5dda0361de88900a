"""How long a training loop waits for its data loader, per step, between two log lines.

Why: the device runs ahead asynchronously, so the time a step spends blocked on ``next(batches)``
is the time the loader, not the model, costs. A data-bound run shows it as a large share of the
step time; a model-bound one as nearly zero. (The pretraining loop fetches the next step's batch
while the device runs the backward pass, so there a wait shorter than that pass costs nothing.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator


class DataWait:
    def __init__(self):
        self.seconds, self.steps = 0.0, 0

    def next(self, batches: Iterator):
        start = time.perf_counter()
        batch = next(batches)
        self.seconds += time.perf_counter() - start
        return batch

    def iterate(self, iterable):
        """``iterable``'s items, each fetch timed (for loops written as ``for batch in loader``)."""
        batches = iter(iterable)
        while True:
            try:
                yield self.next(batches)
            except StopIteration:
                return

    def step(self) -> None:
        """One optimizer step done (skipped steps count too: they waited as well)."""
        self.steps += 1

    def flush_ms(self) -> float:
        """Mean wait per step since the last flush, in milliseconds; starts a new window."""
        ms = 1000 * self.seconds / max(1, self.steps)
        self.seconds, self.steps = 0.0, 0
        return ms
