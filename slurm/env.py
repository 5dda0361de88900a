"""SLURM's view of a job as torch.distributed's ``env://`` variables.

Under submitit the job sets these from its ``JobEnvironment`` (``job.py``). A plain
``srun mimscale pretrain …`` inside an allocation has only SLURM's own variables, so
``init_distributed`` falls back to ``torch_env_from_slurm`` when torchrun's are absent.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_nodelist(nodelist: str) -> list[str]:
    """``"gpu[001-003,007],cpu1"`` -> ``["gpu001", "gpu002", "gpu003", "gpu007", "cpu1"]``.

    SLURM's compact host lists: comma-separated names, each with at most one bracketed group of
    numbers and ranges whose zero padding is kept."""
    hosts, i = [], 0
    while i < len(nodelist):
        match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist[i:])
        prefix, group, suffix = match.group(1), match.group(2), match.group(3)
        if group is None:
            hosts.append(prefix + suffix)
        else:
            for part in group.split(","):
                bounds = _RANGE.match(part.strip())
                if not bounds:
                    raise ValueError(f"cannot read the SLURM node list {nodelist!r} (at {part!r})")
                lo, hi = bounds.group(1), bounds.group(2) or bounds.group(1)
                hosts += [f"{prefix}{n:0{len(lo)}d}{suffix}" for n in range(int(lo), int(hi) + 1)]
        i += match.end() + 1  # past the comma
    return [h for h in hosts if h]


def master_port(job_id: str) -> int:
    """A port every task of a job derives alike, spread so that jobs sharing a node rarely collide."""
    return 20000 + zlib.crc32(job_id.encode()) % 40000


def torch_env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from a task's SLURM
    variables; empty when this is not a task of a multi-task ``srun`` step (nothing to join).

    The step's variables, not the allocation's: a batch script itself (one process) also sees
    ``SLURM_NTASKS`` of the whole allocation and must not wait for peers that never start."""
    ntasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if "SLURM_PROCID" not in environ or ntasks <= 1:
        return {}
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise RuntimeError("a multi-task SLURM step without SLURM_STEP_NODELIST: cannot find the master host")
    job_id = environ.get("SLURM_JOB_ID", "0")
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(ntasks),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(ntasks // max(1, len(hosts))),
        "MASTER_ADDR": environ.get("MASTER_ADDR", hosts[0]),
        "MASTER_PORT": environ.get("MASTER_PORT", str(master_port(job_id))),
    }
