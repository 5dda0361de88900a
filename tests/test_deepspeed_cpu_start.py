"""DeepSpeed on CPUs compiles its shared-memory communication op on the first start on a machine
(minutes before step 1): the run says so first, and says nothing once the library is cached."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from extras import need

SHM_PROBE = textwrap.dedent("""
    # a fresh extension cache: DeepSpeed would compile its CPU op, so the backend says so before
    # DeepSpeed's engine starts; once the library is there, nothing is said
    import deepspeed, torch
    from mimscale.pretrain.engine import zero
    from mimscale.pretrain.engine.backend import DistEnv
    folder = zero.shm_build_pending(deepspeed)
    print("PENDING", folder, flush=True)
    backend = zero.DeepSpeedBackend(torch.device("cpu"), DistEnv(), "fp32", zero_stage=1, micro_batch=1)
    backend.wrap(torch.nn.Linear(2, 2))
    def stop(**kwargs):
        raise SystemExit("stopped before DeepSpeed's engine (it would compile for minutes)")
    deepspeed.initialize = stop
    try:
        backend.build_optimizer([{"params": list(backend.module.parameters())}], 1e-3, (0.9, 0.95))
    except SystemExit as e:
        print(e, flush=True)
    (folder / "deepspeed_shm_comm.so").write_bytes(b"")
    print("PENDING", zero.shm_build_pending(deepspeed), flush=True)
""")


@pytest.mark.slow
def test_deepspeed_says_when_its_first_cpu_start_compiles(tmp_path):
    need("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", SHM_PROBE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PENDING", "deepspeed:", "stopped"))]
    folder = tmp_path / "ext" / "deepspeed_shm_comm"
    assert lines == [
        f"PENDING {folder}",
        "deepspeed: compiling its shared-memory communication op for CPUs before step 1: minutes, once per "
        f"machine (cached in {folder} for later starts)",
        "stopped before DeepSpeed's engine (it would compile for minutes)",
        "PENDING None",
    ]
