"""A pretraining run resumed mid-epoch on another number of ranks, in real gloo process groups:
2 -> 1 and 1 -> 2. The samples the training steps consumed before and after the resume make up the
epoch exactly once, and the next epoch is the new layout's ordinary one."""

import json
from pathlib import Path

import pytest
from distributed_utils import (
    one_thread,  # noqa: F401  (autouse fixture)
    spawn,
    tiny_overrides,
)

from mimscale.config import load_config
from mimscale.data_pipeline.build import build_pretrain_data
from mimscale.data_pipeline.loader import PretrainLoader
from mimscale.pretrain.engine.checkpoint import read_state

N = 48  # tiny_overrides: 48 images, batch 8 -> 3 batches an epoch on 2 ranks, 6 on 1


def _train(overrides: list[str], record: Path) -> None:
    """Train; write the (epoch, batch, sample ids) of every micro-batch a step consumed to ``record``."""
    from mimscale.pretrain.engine.trainer import Trainer

    consumed, micro_step = [], Trainer._micro_step

    def recording(self, batch, generator, sync):
        consumed.append((batch["epoch"], batch["batch"], batch["index"].tolist()))
        return micro_step(self, batch, generator, sync)

    Trainer._micro_step = recording
    try:
        Trainer(load_config(overrides)).fit()
    finally:
        Trainer._micro_step = micro_step
    record.write_text(json.dumps(consumed))


def _two_ranks(rank, world, base, root):
    root = Path(root)
    # 2 -> 1: one step on each of 2 ranks (16 of 48 samples), resumed on 1 below
    _train(base + [f"output.dir={root / 'two_one'}", "schedule.max_steps=1"], root / f"two_one_{rank}.json")
    # 1 -> 2: resume the 1-rank run's checkpoint of step 2: 32 samples left = 2 steps, then epoch 1
    _train(base + [f"output.dir={root / 'one_two'}", "schedule.max_steps=7", "resume=auto"],
           root / f"one_two_{rank}.json")


def _read(path: Path) -> list[tuple[int, int, list[int]]]:
    return [tuple(x) for x in json.loads(path.read_text())]


def _epoch_one(cfg, rank: int, world: int) -> list[list[int]]:
    """The sample ids of epoch 1 on ``rank`` of ``world``, from a fresh loader of that layout."""
    one = build_pretrain_data(cfg.data, cfg.model.img_size, cfg.engine.seed)
    ld = PretrainLoader(one.source, one.views, cfg.data.batch_size, cfg.engine.seed, 0, rank, world)
    ld.load_state_dict({**ld.state_dict(), "epoch": 1})
    it = iter(ld)
    return [next(it)["index"].tolist() for _ in range(ld.steps_per_epoch)]


def _ids(records) -> list[int]:
    return sorted(i for _, _, ids in records for i in ids)


@pytest.mark.slow
def test_resume_on_other_rank_counts_reads_each_sample_of_the_epoch_once(tmp_path):
    base = tiny_overrides(tmp_path / "unused", tmp_path / "data")
    cfg = load_config(base)
    _train(base + [f"output.dir={tmp_path / 'one_two'}", "schedule.max_steps=2"], tmp_path / "one_two_before.json")
    spawn(_two_ranks, 2, base, str(tmp_path), timeout=400)
    _train(base + [f"output.dir={tmp_path / 'two_one'}", "schedule.max_steps=11", "resume=auto",
                   "output.checkpoint_every=2", "output.keep_last=null"], tmp_path / "two_one_after.json")
    # a checkpoint inside the rest records where it stands in it and the layout before it
    inside = read_state(tmp_path / "two_one" / "checkpoints" / "step_00000002")["data"]
    assert (inside["epoch"], inside["batch_in_epoch"], inside["world_size"]) == (0, 1, 1)
    assert inside["earlier"] == [{"world_size": 2, "workers": 1, "batch_size": 8, "remainder": "drop", "batches": 1}]

    # 2 -> 1: each rank read batch 0 of epoch 0; one rank reads the 32 others in 4 batches
    before = _read(tmp_path / "two_one_0.json") + _read(tmp_path / "two_one_1.json")
    after = _read(tmp_path / "two_one_after.json")
    assert [(e, b) for e, b, _ in before] == [(0, 0), (0, 0)]
    assert [(e, b) for e, b, _ in after] == [(0, b) for b in range(4)] + [(1, b) for b in range(6)]
    assert _ids(before + after[:4]) == list(range(N))  # the epoch, each sample once
    assert [ids for _, _, ids in after[4:]] == _epoch_one(cfg, 0, 1)  # then an ordinary epoch

    # 1 -> 2: one rank read 2 batches of epoch 0; each of 2 ranks reads 2 of the 32 others
    before = _read(tmp_path / "one_two_before.json")
    after = [_read(tmp_path / f"one_two_{r}.json") for r in range(2)]
    assert [(e, b) for e, b, _ in before] == [(0, 0), (0, 1)]
    for rank, rec in enumerate(after):
        assert [(e, b) for e, b, _ in rec] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
        assert [ids for _, _, ids in rec[2:]] == _epoch_one(cfg, rank, 2)
    assert _ids(before + after[0][:2] + after[1][:2]) == list(range(N))
    assert _ids(after[0][2:] + after[1][2:]) == list(range(N))
