"""Numerics guard: non-finite steps are skipped (nothing applied, the teacher does not follow),
counted, and too many in a row stop the run with the last good checkpoint intact."""

from __future__ import annotations

import json

import pytest
import torch
from distributed_utils import one_thread  # noqa: F401  (autouse fixture)

from mimscale.pretrain.engine.checkpoint import load_checkpoint
from mimscale.pretrain.engine.guard import NonFiniteError, NumericsGuard, poison_nonfinite
from mimscale.pretrain.engine.trainer import Trainer


def test_poison_keeps_finite_gradients_and_poisons_nonfinite_ones():
    w = torch.randn(5, requires_grad=True)
    poison_nonfinite((w ** 2).sum()).backward()
    assert torch.equal(w.grad, 2 * w.detach())  # ×1.0: bit-identical
    w.grad = None
    # inf from a term without a gradient would leave finite gradients: they are poisoned anyway
    poison_nonfinite((w ** 2).sum() + torch.tensor(float("inf"))).backward()
    assert torch.isnan(w.grad).all()


def test_guard_counts_streaks_and_stops_at_the_check_after_the_budget():
    guard = NumericsGuard(max_consecutive=2)
    for step, finite in enumerate([True, False, True, False, False], start=1):
        guard.record(step, torch.tensor(finite))
    guard.check()
    assert (guard.skipped, guard.streak) == (3, 2)
    guard.record(6, torch.tensor(False))  # the streak passes the budget here ...
    guard.record(7, torch.tensor(True))   # ... and ends before the check: still caught
    assert (guard.skipped, guard.streak) == (4, 0)
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps \(up to step 6\).*max_nonfinite_steps=2"):
        guard.check()
    zero = NumericsGuard(0)
    zero.record(1, False)  # a bool the caller has read already
    with pytest.raises(NonFiniteError):
        zero.check()
    resumed = NumericsGuard(2)
    resumed.load_state_dict({"skipped": 5})
    assert resumed.skipped == 5
    resumed.record(1, torch.tensor(False))
    assert resumed.state_dict() == {"skipped": 6} and type(resumed.state_dict()["skipped"]) is int


def test_skipped_steps_change_nothing_and_a_diverged_run_keeps_its_last_good_checkpoint(
        tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("schedule.max_steps=8", "output.checkpoint_every=1", "output.keep_last=2",
                      "engine.max_nonfinite_steps=2", "teacher.type=ema")
    trainer = Trainer(cfg)
    real_forward = type(trainer.method).forward

    def forward(self, images, generator, *views):  # step 2 alone is bad; from step 4 on every step is
        out = real_forward(self, images, generator, *views)
        return out._replace(loss=out.loss * float("nan")) if self.step == 1 or self.step >= 3 else out

    monkeypatch.setattr(type(trainer.method), "forward", forward)
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        trainer.fit()
    # step 2 was skipped without a checkpoint; 4, 5, 6 were skipped, and 6 stopped the run
    assert [s for s, _ in trainer.checkpoints.complete()] == [1, 3]
    good = load_checkpoint(trainer.checkpoints.latest())
    now_student, now_rest = trainer.method.split_state_dict(trainer.method.state_dict())
    for k, v in good["model"].items():
        assert torch.equal(now_student[k], v), k  # three skipped steps changed no weight
    for k, v in good["method"].items():
        if k.startswith("teacher."):
            assert torch.equal(now_rest[k], v), k  # and the EMA teacher did not follow them
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 2, 3]
    assert ["loss" in r for r in records] == [True, False, True, False, False]
    assert records[1]["grad_norm"] is None and records[2]["grad_norm"] > 0
