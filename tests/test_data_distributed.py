"""Two real processes (gloo) x two loader workers each, built as the trainer builds its data:
every sample of an epoch reaches exactly one (rank, worker), for every source."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from extras import need

from mimscale.config import load_config
from mimscale.data_pipeline.build import build_pretrain_data
from mimscale.data_pipeline.synthetic import write_shards
from mimscale.pretrain.engine.backend import leave_process_group

N = 26


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, data_configs, out):
    # Ranks started by torchrun or srun are fresh processes whose loader workers fork; children
    # of mp.spawn would spawn them instead (re-importing everything: ~20 s here), so fork as well.
    mp.set_start_method("fork", force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = {}
        for name, cfg_data in data_configs.items():
            data = build_pretrain_data(cfg_data, 16, seed=0, rank=rank, world_size=2)
            batches = [b for _, b in zip(range(data.steps_per_epoch), data)]
            mine = [(rank, b["worker"], i) for b in batches for i in b["index"].tolist()]
            gathered = [None, None]
            dist.all_gather_object(gathered, (data.steps_per_epoch, mine))
            result[name] = gathered
        if rank == 0:
            torch.save(result, out)
    finally:
        leave_process_group(together=False)


@pytest.mark.slow
def test_two_ranks_two_workers_exactly_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMSCALE_CACHE", str(tmp_path / "cache"))
    base = ["data.batch_size=3", "data.num_workers=2", "data.remainder=pad"]
    wds = write_shards(tmp_path / "wds", N, size=24, max_count=4, progress=False)  # 7 shards < 2 x 2 x 2
    sources = {
        "synthetic": base + ["data.source=synthetic", f"data.synthetic_images={N}", "data.synthetic_size=24"],
        "wds": base + ["data.source=wds", f"data.urls={str(wds.parent)}/shard-{{000000..000006}}.tar"],
    }
    if need("ffcv"):
        beton = write_shards(tmp_path / "d.beton", N, size=24, fmt="beton", progress=False)
        sources["ffcv"] = base + ["data.source=ffcv", f"data.urls={beton}"]
    out = tmp_path / "result.pt"
    configs = {name: load_config(overrides).data for name, overrides in sources.items()}
    mp.spawn(_worker, args=(_free_port(), configs, out), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    for name, per_rank in result.items():
        (steps0, ids0), (steps1, ids1) = per_rank
        assert steps0 == steps1 == 5, name  # 26 padded to 30 = 2 ranks x 5 batches of 3
        owners = {}
        for rank, worker, i in ids0 + ids1:
            owners.setdefault(i, []).append((rank, worker))
        assert set(owners) == set(range(N)), name
        assert sum(len(v) for v in owners.values()) == 30 and all(len(v) <= 2 for v in owners.values())
        assert {o for v in owners.values() for o in v} == {(r, w) for r in range(2) for w in range(2)}
        twice = [i for i, v in owners.items() if len(v) == 2]
        assert len(twice) == 4, name  # only the padding repeats
