"""Numerics guard: a step whose loss or gradient norm is not finite is skipped, not applied.

Skipping is decided on the global gradient norm, which every rank computes identically, so ranks
never disagree. A non-finite loss is folded into its own gradients first (``poison_nonfinite``),
so the one norm check covers both. Too many skips in a row mean the run has diverged: it stops,
and the checkpoints it wrote before are left as they are.
"""

from __future__ import annotations

import torch


class NonFiniteError(RuntimeError):
    """Raised when more than ``max_consecutive`` steps in a row were non-finite."""


def poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` itself when finite, else ``loss × NaN``: the gradients of a non-finite loss become
    NaN (even where its inf came from a term without gradient), all on the device, no host sync."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))


class NumericsGuard:
    """Counts skipped steps on the device and stops a diverged run.

    ``record`` runs every step and reads nothing on the host; ``check`` reads the counters (one
    sync) and raises ``NonFiniteError`` if the streak ever exceeded the budget since the last
    check. The pretraining loop checks when it logs (``logging.log_every``) and at checkpoints, so
    a diverged run stops at the first such boundary after the streak passed the budget, not at
    that very step; the step it passed it at is in the error. ``streak`` and ``skipped`` read the
    counters on the host too: for boundaries only."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self._loaded = 0   # skipped steps of the run before a resume, until the first record
        # [streak, skipped, step at which the streak passed the budget (0: it has not)]
        self._counts: torch.Tensor | None = None

    def record(self, step: int, finite: torch.Tensor | bool) -> None:
        """Count optimizer step ``step``; ``finite``: whether it was applied (a bool tensor, or a
        bool where the caller has read it already)."""
        finite = torch.as_tensor(finite)
        if self._counts is None:  # filled on the device: a tensor from a list would be a blocking copy
            self._counts = torch.zeros(3, dtype=torch.long, device=finite.device)
            self._counts[1] += self._loaded
        streak, skipped, over = self._counts.unbind()
        streak = torch.where(finite, 0, streak + 1)
        over = torch.where((over == 0) & (streak > self.max_consecutive), step, over)
        self._counts = torch.stack([streak, skipped + (~finite).long(), over])

    def check(self) -> None:
        """Raise if the streak has exceeded the budget (a host read of the counters)."""
        if self._counts is None:
            return
        over = int(self._counts[2])
        if over:
            raise NonFiniteError(
                f"{self.max_consecutive + 1} consecutive steps (up to step {over}) had a non-finite loss or "
                f"gradient norm, more than engine.max_nonfinite_steps={self.max_consecutive}: the run has "
                "diverged and stops here; the checkpoints written before are untouched (lower the lr, "
                "raise warmup, or set optim.clip_grad)")

    @property
    def streak(self) -> int:
        """Consecutive skipped steps up to now (a host read)."""
        return 0 if self._counts is None else int(self._counts[0])

    @property
    def skipped(self) -> int:
        """Skipped steps in the whole run (a host read)."""
        return self._loaded if self._counts is None else int(self._counts[1])

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self._loaded, self._counts = int(state.get("skipped", 0)), None
