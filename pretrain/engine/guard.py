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
    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.streak = 0       # consecutive skipped steps up to now
        self.skipped = 0      # skipped steps in the whole run

    def record(self, step: int, finite: bool) -> None:
        """Count one optimizer step; raise once the streak exceeds the budget."""
        if finite:
            self.streak = 0
            return
        self.streak += 1
        self.skipped += 1
        if self.streak > self.max_consecutive:
            raise NonFiniteError(
                f"{self.streak} consecutive steps (up to step {step}) had a non-finite loss or gradient "
                f"norm, more than engine.max_nonfinite_steps={self.max_consecutive}: the run has diverged "
                "and stops here; the checkpoints written before are untouched (lower the lr, raise "
                "warmup, or set optim.clip_grad)")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
