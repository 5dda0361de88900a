"""No host sync per step: whether a step is applied, the EMA teacher, the guard's counts and the
metrics window are all decided on the device; the host reads them at log lines and checkpoints.

Host reads are counted by wrapping the tensor methods that copy a value to the host (``item``,
``__float__``, ``__int__``, ``__bool__``, ``cpu``, ``tolist``, ``numpy``). A call counts when the
calling stack holds a frame of ``mimscale.pretrain`` (the step's code: engine, method, masking,
teacher, models, objectives; torch internals they call, such as the optimizer's step, are reached
through those frames and so count too) and no frame of the data pipeline (``data_pipeline``,
``torch.utils.data``). Why this filter: the loader reads its CPU batches on the host (uint8 images
from the workers), which is no device sync, while every other read in a step would be one on CUDA.
On CUDA, torch's sync debug mode also runs over the same steps: it catches syncs that no Python
method shows (``nonzero``, boolean indexing, a device-to-host copy).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mimscale.pretrain.engine.backend import DDPBackend, DistEnv, leave_process_group
from mimscale.pretrain.engine.trainer import Trainer

READS = ("item", "__float__", "__int__", "__bool__", "cpu", "tolist", "numpy")
STEP_CODE = os.sep + "pretrain" + os.sep
LOADER_CODE = (os.sep + "data_pipeline" + os.sep, os.sep.join(("torch", "utils", "data")))


class HostReads:
    """Counts host reads from the step's code, in two buckets: inside the loop iterations that end
    between two log lines (``between``) and in the others (``boundary``)."""

    def __init__(self):
        self.between, self.boundary, self.active = [], [], False

    def wrap(self, monkeypatch, name):
        real = getattr(torch.Tensor, name)

        def counted(t, *args, **kwargs):
            frames, f = [], sys._getframe(1)
            while f is not None:
                frames.append(f.f_code.co_filename)
                f = f.f_back
            if any(STEP_CODE in n for n in frames) and not any(c in n for n in frames for c in LOADER_CODE):
                where = f"{name} from {sys._getframe(1).f_code.co_filename}:{sys._getframe(1).f_lineno}"
                (self.between if self.active else self.boundary).append(where)
            return real(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.fixture
def gloo_group_after():
    """FSDP makes a one-rank group in this process: remove it again afterwards."""
    had = dist.is_initialized()
    yield
    if not had and dist.is_initialized():
        leave_process_group(together=False)


# on a GPU machine also on CUDA, under torch's sync debug mode (no CI machine has one: not a skip)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# deepspeed on the CPU only: its step syncs by design, and a GPU session carries no DeepSpeed build
@pytest.mark.parametrize(("backend", "device"), [(b, d) for b in ("ddp", "fsdp") for d in DEVICES] + [("deepspeed", "cpu")])
def test_no_host_read_between_two_log_lines(tiny_config, monkeypatch, backend, device, gloo_group_after):
    """ddp and fsdp: nothing read. deepspeed: its ZeRO optimizer reads the gradient norm on the host
    inside its own step (its overflow check), so there every read must be DeepSpeed's, none
    mimscale's nor torch's optimizer's."""
    cfg = tiny_config("recipe=mae", f"engine.backend={backend}", f"engine.device={device}", "schedule.max_steps=10",
                      "logging.log_every=4", "engine.memory_report_steps=0", "teacher.type=ema",
                      "optim.clip_grad=1.0")
    trainer = Trainer(cfg)
    reads = HostReads()
    for name in READS:
        reads.wrap(monkeypatch, name)
    real_step = Trainer.train_step
    cuda = device == "cuda"  # its first step compiles the blocks (engine.compile=auto), which syncs once
    strict = backend != "deepspeed"

    def train_step(self, batches, wait):  # the loop iteration this step begins, up to the next one
        after = self.step + 1
        reads.active = not (after % cfg.logging.log_every == 0 or after % cfg.output.checkpoint_every == 0
                            or after == self.total_steps or (cuda and after == 1))
        if cuda and strict:
            torch.cuda.set_sync_debug_mode("error" if reads.active else 0)
        return real_step(self, batches, wait)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    try:
        summary = trainer.fit()
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    assert summary.steps == 10 and [s for s, _ in summary.losses] == [4, 8, 10]
    ours = [r for r in reads.between if strict or f"{os.sep}deepspeed{os.sep}" not in r]
    assert ours == []                   # steps 1-3 (CUDA: 2-3), 5-7, 9: nothing read on the host
    assert strict or reads.between      # (the deepspeed case does see DeepSpeed's own reads)
    assert len(reads.boundary) > 0      # the counter does see the reads of a log line


def _tiny_backend(seed: int = 0) -> DDPBackend:
    torch.manual_seed(seed)
    backend = DDPBackend(torch.device("cpu"), DistEnv(), "fp32")
    backend.wrap(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)))
    backend.build_optimizer([{"params": list(backend.module.parameters()), "weight_decay": 0.05}], 1e-2, (0.9, 0.95))
    return backend


def _backward(backend: DDPBackend, poison: bool) -> None:
    loss = backend.module(torch.randn(3, 4)).square().mean()
    backend.backward(loss * float("nan") if poison else loss)


def _snapshot(backend: DDPBackend) -> list[torch.Tensor]:
    state = [t for s in backend.optimizer.state.values() for t in s.values()]
    return [t.detach().clone() for t in [*backend.module.parameters(), *state]]


@pytest.mark.parametrize("clip", [None, 0.5])
def test_a_skipped_step_changes_no_parameter_nor_adamw_state(clip):
    backend = _tiny_backend()
    _backward(backend, poison=False)
    first = backend.step(clip)
    assert torch.isfinite(first) and first.device == backend.device
    before = _snapshot(backend)  # parameters, exp_avg, exp_avg_sq, step
    _backward(backend, poison=True)
    assert not torch.isfinite(backend.step(clip))
    after = _snapshot(backend)
    assert len(after) == len(before) == 4 + 4 * 3
    for b, a in zip(before, after):
        assert torch.equal(b, a)
    assert all(float(s["step"]) == 1 for s in backend.optimizer.state.values())
    assert all(p.grad is None for p in backend.module.parameters())
    _backward(backend, poison=False)  # and the next good step is applied
    assert torch.isfinite(backend.step(clip))
    assert all(float(s["step"]) == 2 for s in backend.optimizer.state.values())
    assert not torch.equal(next(backend.module.parameters()), before[0])


@pytest.mark.parametrize(("overrides", "allowed"), [
    (["masking.strategy=gpa", "teacher.type=ema", "masking.gpa.head=mean"], 0),
    (["masking.strategy=sbam"], 0),
    (["recipe=ccmim"], 0),  # its masked-set pass too
    (["recipe=gpa", "teacher.type=ema", "masking.gpa.head=mean", "objectives.mam.head=decoder", "objectives.mam.start=0"], 0),  # MAM decoder
    (["masking.strategy=ccmim", "masking.selector=noisy_topk"], 0),  # Gumbel keys drawn on the host
    (["masking.shots=[{layer: 0.5, ratio: 0.5, guide: gpa}]"], 0),  # shot counts follow on the host
    (["masking.strategy=sbam_amr"], 1),  # per-image counts: read once, to size the packed batch
])
def test_guided_masking_reads_the_host_only_for_ragged_counts(tiny_config, monkeypatch, overrides, allowed):
    """Score, select, gather and scatter of one training forward and backward (mask included): with a
    fixed ratio nothing is read on the host; AMR reads its per-image counts once."""
    from mimscale.pretrain.method import MIMMethod

    torch.manual_seed(0)
    method = MIMMethod(tiny_config(*overrides, "engine.varlen=nested")).train()  # packed, as auto on CUDA
    images = torch.randn(4, 3, 32, 32)
    reads = HostReads()
    for name in READS:
        reads.wrap(monkeypatch, name)
    reads.active = True
    method(images, torch.Generator().manual_seed(0)).loss.backward()
    reads.active = False
    assert len(reads.between) == allowed, reads.between
