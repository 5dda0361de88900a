"""The CLI leaves the process group it joined, all ranks together; a group it found stays."""

from __future__ import annotations

import torch.distributed as dist
from distributed_utils import one_thread, spawn, tiny_overrides  # noqa: F401  (autouse fixture)

from mimscale.cli import main


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
        dist.destroy_process_group()
