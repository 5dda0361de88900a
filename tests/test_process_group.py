"""The CLI leaves the process group it joined, all ranks together; a group it found stays."""

from __future__ import annotations

import torch.distributed as dist
from distributed_utils import one_thread, spawn, tiny_overrides  # noqa: F401  (autouse fixture)

from mimscale.cli import main
from mimscale.pretrain.engine.backend import leave_process_group


def _rank(rank, world, out, data):
    assert main(["pretrain", *tiny_overrides(out, data), "schedule.max_steps=2", "data.batch_size=4"]) == 0
    assert not dist.is_initialized()  # left after a barrier, so no rank outlives rank 0's store


def test_cli_leaves_the_group_it_joined(tmp_path):
    spawn(_rank, 2, str(tmp_path / "run"), str(tmp_path / "data"))
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "COMPLETE").exists()


def test_cli_keeps_a_group_it_did_not_join(tiny_overrides):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert main(["pretrain", *tiny_overrides, "schedule.max_steps=1"]) == 0
        assert dist.is_initialized()
    finally:
        leave_process_group(together=False)


def test_two_deepspeed_runs_in_one_process(tmp_path):
    """The group the first run made and left is DeepSpeed's too: left through DeepSpeed, which then
    forgets its clone of the world group, the second run's DeepSpeed starts clean (left to torch,
    it failed with "Group ... is not registered")."""
    from distributed_utils import tiny_overrides as overrides

    for name in ("a", "b"):
        assert main(["pretrain", *overrides(tmp_path / name, tmp_path / "data"), "engine.backend=deepspeed",
                     "engine.device=cpu", "schedule.max_steps=1"]) == 0
        assert not dist.is_initialized()
