"""Helpers for the multi-process tests: free ports, ranks spawned with a deadline, the tiny run.

Workers are real processes joined in a real gloo process group (through the same environment
variables torchrun sets), so the code under test takes the path a cluster job takes.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread per process is as fast, and immune to a busy CPU (with two
    threads on an oversubscribed machine every small op waits for its second thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(out_dir, data_dir) -> list[str]:
    """The few-second run of conftest's ``tiny_overrides``, for processes without fixtures; the
    generated images go to ``data_dir`` (shared by every run given the same folder)."""
    return [
        "model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8",
        "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
        "data.source=synthetic", f"data.root={data_dir}", "data.synthetic_images=48", "data.synthetic_size=40",
        "data.batch_size=8", "data.num_workers=0", "optim.blr=1e-3", "schedule.warmup_steps=2",
        "engine.precision=fp32", "logging.log_every=1", "logging.image_every=0", "logging.progress=off",
        "logging.tensorboard=false", f"output.dir={out_dir}",
    ]


def _entry(rank, fn, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # two ranks on two cores
    fn(rank, world, *args)
    from mimscale.pretrain.engine.backend import leave_process_group

    # Tear down together: rank 0 hosts the TCP store, and a rank that is still using the group when
    # rank 0 has left can abort in a C++ thread ("terminate called without an active exception"),
    # failing a job whose work was done.
    leave_process_group(together=True)
    # Then skip the interpreter's teardown. A rank once aborted with that same message in a full
    # suite run, after every result was written (never in 100 runs of a similar job alone): if it
    # was torch's exit, this avoids it; if it was the leaving itself, the stacks printed under
    # PYTHONFAULTHANDLER (set in conftest) will show where next time. What the tests check is in
    # the results, not in how torch exits.
    for stream in (sys.stdout, sys.stderr):  # a job may have pointed them at a file it closed
        if not stream.closed:
            stream.flush()
    os._exit(0)


def spawn(fn, world: int, *args, timeout: float = 240.0) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh processes; a rank's exception fails the
    caller with its traceback, and a hung collective is killed at ``timeout`` seconds."""
    ctx = mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.time())):
        if time.time() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world} ranks did not finish within {timeout:.0f}s (hung collective?)")
