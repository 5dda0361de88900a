"""Pretraining through the CLI on webdataset shards and on a .beton, with exact resume."""

import math
import shutil

import pytest
import torch
from extras import need

from mimscale.cli import main
from mimscale.data_pipeline.synthetic import write_shards
from mimscale.pretrain.engine.checkpoint import load_checkpoint
from mimscale.pretrain.engine.logger import read_metrics


def _run(tiny_overrides, out, *extra):
    overrides = [o for o in tiny_overrides if not o.startswith("output.dir=")]
    assert main(["pretrain", *overrides, f"output.dir={out}", *extra]) == 0
    return read_metrics(out / "metrics.jsonl")


@pytest.mark.slow
def test_pretrain_on_wds_shards_resumes_exactly(tiny_overrides, tmp_path):
    write_shards(tmp_path / "wds", 48, size=40, max_count=10, progress=False)  # 5 shards, 6 steps/epoch
    data = ["data.source=wds", f"data.urls={tmp_path}/wds/shard-{{000000..000004}}.tar", "data.num_workers=2",
            "output.checkpoint_every=3"]
    straight = _run(tiny_overrides, tmp_path / "a", *data, "schedule.max_steps=5")
    assert [r["step"] for r in straight] == list(range(1, 6)) and all(math.isfinite(r["loss"]) for r in straight)
    state = load_checkpoint(tmp_path / "a" / "checkpoints" / "step_00000003")
    assert (state["data"]["epoch"], state["data"]["batch_in_epoch"]) == (0, 3)  # mid-epoch position
    # a run that died right after its step-3 checkpoint, resumed
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_00000003", tmp_path / "b" / "checkpoints" / "step_00000003")
    resumed = _run(tiny_overrides, tmp_path / "b", *data, "schedule.max_steps=5", "resume=auto")
    assert [r["step"] for r in resumed] == [4, 5]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight if r["step"] > 3]
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "step_00000005")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "step_00000005")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_pretrain_on_a_beton(tiny_overrides, tmp_path):
    need("ffcv")
    beton = write_shards(tmp_path / "train.beton", 32, size=40, fmt="beton", progress=False)
    records = _run(tiny_overrides, tmp_path / "run", "data.source=ffcv", f"data.urls={beton}",
                   "schedule.max_steps=3", "data.views=mocov3")
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)


def test_pretrain_on_a_missing_shard_fails_at_start(tiny_overrides, tmp_path, capsys):
    write_shards(tmp_path / "wds", 8, size=40, max_count=4, progress=False)
    assert main(["pretrain", *tiny_overrides, "data.source=wds",
                 f"data.urls={tmp_path}/wds/shard-{{000000..000002}}.tar"]) == 2
    assert "shard-000002.tar" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
