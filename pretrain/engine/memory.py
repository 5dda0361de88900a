"""Per-rank memory report: what each rank holds of parameters, gradients, optimizer state and
teacher, and the peak during the first steps.

Why: the point of sharding is the per-rank footprint, so it is measured on the tensors each rank
actually stores (a DTensor's local shard, a ZeRO-3 partition), not computed from a formula.
"""

from __future__ import annotations

import json
import resource
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = ()


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank stores for ``t``: a DTensor's local shard, plus a ZeRO-3 partition."""
    if isinstance(t, DTensor):
        t = t.to_local()
    n = t.numel() * t.element_size()
    partition = getattr(t, "ds_tensor", None)
    if partition is not None:
        n += partition.numel() * partition.element_size()
    return n


def nested_bytes(obj) -> int:
    """Bytes of every tensor inside nested dicts / lists / tuples (an optimizer's state)."""
    if isinstance(obj, torch.Tensor):
        return local_bytes(obj)
    if isinstance(obj, dict):
        return sum(nested_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nested_bytes(v) for v in obj)
    return 0


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the model's parameters without the teacher, bytes of the teacher's)."""
    teacher = getattr(model, "teacher", None)
    teacher_ids = {id(p) for p in teacher.parameters()} if isinstance(teacher, nn.Module) else set()
    model_bytes = teacher_bytes = 0
    for p in model.parameters():
        if id(p) in teacher_ids:
            teacher_bytes += local_bytes(p)
        else:
            model_bytes += local_bytes(p)
    return model_bytes, teacher_bytes


def gradient_bytes(model: nn.Module) -> int:
    return sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class MemoryReport:
    rank: int
    params: int         # parameters held by this rank (without the teacher)
    grads: int          # gradient storage at the optimizer step
    optimizer: int      # optimizer state (moments, and fp32 master copies where a backend keeps them)
    teacher: int        # teacher parameters held by this rank
    peak_rss: int       # peak resident memory of the process during the first steps
    peak_cuda: int | None = None  # torch.cuda.max_memory_allocated, on GPUs

    @property
    def states(self) -> int:
        """Parameters + gradients + optimizer state: what ZeRO / FSDP divide by the world size."""
        return self.params + self.grads + self.optimizer


def measure(rank: int, held: dict[str, int], device: torch.device) -> MemoryReport:
    peak_cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return MemoryReport(rank, held["params"], held["grads"], held["optimizer"], held["teacher"],
                        peak_rss_bytes(), peak_cuda)


def _mb(n: int | None) -> str:
    return f"{'-':>10}" if n is None else f"{n / 2**20:10.1f}"


def format_reports(reports: list[MemoryReport], backend: str) -> str:
    """A table in MiB; ``states`` = params + grads + optimizer."""
    cols = ("params", "grads", "optimizer", "teacher", "states", "peak_rss", "peak_cuda")
    lines = [f"memory per rank ({backend}, MiB):", "  rank" + "".join(f"{c:>10}" for c in cols)]
    for r in reports:
        values = (r.params, r.grads, r.optimizer, r.teacher, r.states, r.peak_rss, r.peak_cuda)
        lines.append(f"{r.rank:6d}" + "".join(_mb(v) for v in values))
    return "\n".join(lines)


def write_reports(path: Path, reports: list[MemoryReport], backend: str, step: int,
                  start_step: int = 0) -> None:
    """Add this start's report to ``path`` (``{"reports": [...]}``, one per start of the run: a
    resumed run may run on another backend or number of ranks, so it keeps the earlier ones)."""
    path = Path(path)
    entry = {"backend": backend, "step": step, "start_step": start_step,
             "ranks": [{**asdict(r), "states": r.states} for r in reports]}
    data = {"reports": [*read_reports(path), entry] if path.is_file() else [entry]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)  # a kill mid-write leaves the previous reports whole


def read_reports(path: str | Path) -> list[dict]:
    """The reports of a ``memory.json``, oldest start first (a file of one report, as written
    before reports were kept per start, is read as a list of one)."""
    data = json.loads(Path(path).read_text())
    return data.get("reports", [data])
