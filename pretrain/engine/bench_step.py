"""``mimscale bench step``: images/s, TFLOP/s, MFU, data-wait share and peak memory of the real
training step of one config (a recipe plus ``key=value`` overrides, as ``mimscale pretrain``).

The step is the trainer's own (``Trainer.train_step``: masking, forward, backward, optimizer step,
EMA teacher), so the figures are those a run would log. Data comes from memory by default: one batch
read through the config's views once and reused every step, so the figures are the model's alone;
``--data real`` reads the config's source through the loader, one batch ahead as training does.
After ``--warmup`` steps (compilation, allocator, cuDNN choices), ``--steps`` steps are timed between
two device synchronisations; the trainer's own per-step read of the gradient norm is the only other
one. TFLOP/s and MFU use the analytic count (``engine.flops``), the same formula as the training log.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from mimscale.config import apply_overrides, load_config
from mimscale.errors import UserError

from .data_wait import DataWait

# what a memory-fed bench changes: a generated set the size of one batch stands in for the source
MEMORY_DATA = ["data.source=synthetic", "data.root=null", "data.urls=null", "data.num_workers=0"]
RATES = ("images_per_s", "step_ms", "tflops_per_s", "mfu", "data_wait_share", "peak_mem_gb")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. recipe=mae "
                   "model.name=mae_vit_base_patch16 engine.precision=bf16")
    p.add_argument("--batch", default=None, help="images per step, or a comma list to sweep, e.g. 32,64,128 "
                   "(default: data.batch_size)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--data", choices=("memory", "real"), default="memory",
                   help="memory: one batch reused (pure compute); real: the config's source through the loader")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="after the timed steps, profile 5 more with torch.profiler and write the operators "
                        "that took the most time (a table, one per batch size: FILE, FILE.b<batch>...)")
    p.add_argument("--count-only", action="store_true",
                   help="print the analytic FLOP breakdown of one step and exit (nothing runs)")


class _Reuse:
    """One batch handed out for ever, through the interface the trainer reads batches with."""

    def __init__(self, batch: dict):
        self.batches = itertools.repeat(batch)

    def next(self, wait: DataWait) -> dict:
        return wait.next(self.batches)

    def fetch(self, wait: DataWait) -> None:
        """Nothing to read ahead."""

    def close(self) -> None:
        """Nothing to stop."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> tuple[float, str]:
    """(GB, what was measured): the CUDA allocator's peak, or on a CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "process peak RSS"


def _profile(trainer, batches, device: torch.device, out: Path, steps: int = 5) -> float | None:
    """``steps`` more training steps under torch.profiler; the operators by self time, to ``out``:
    where a figure falls short of the peak, this says which kernels hold it back. On CUDA also the
    share of the profiled time in which some kernel ran (returned): well under 1, the device waits
    for the host (Python dispatch, a sync, data), whatever its kernels' speed."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step(batches, DataWait())
        _sync(device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    busy = None
    head = f"{steps} training steps, operators by {key}\n"
    if cuda:
        events = list(prof.events())
        kernels = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
        start = min(e.time_range.start for e in events)
        end = max(e.time_range.end for e in events)
        busy = busy_share(kernels, start, end)
        per_step_ms = (end - start) / 1e3 / steps
        head += f"device busy (a kernel or copy running) {busy:.1%} of the profiled {per_step_ms:.1f} ms per step\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(head + prof.key_averages().table(sort_by=key, row_limit=30) + "\n")
    return busy


def busy_share(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """The share of ``[start, end)`` covered by the union of ``intervals`` (overlaps counted once:
    kernels of several streams may run at the same time)."""
    covered, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            covered += b - a
            reach = b
    return covered / (end - start) if end > start else 0.0


def measure(cfg, warmup: int, steps: int, data: str, profile: Path | None = None) -> dict:
    """One config: ``warmup`` steps, then ``steps`` timed steps of the trainer (then, with
    ``profile``, a profiled few written there); one result row."""
    from .trainer import Trainer, _OneAhead

    trainer = Trainer(cfg)
    device = trainer.backend.device
    if data == "memory":
        loader = iter(trainer.data)
        batches = _Reuse(next(loader))
        loader.close()
        trainer.steps_per_epoch = trainer.total_steps  # a one-batch "epoch" would end every step
    else:
        batches = _OneAhead(trainer.data)
    try:
        trainer.backend.model.train()
        for _ in range(warmup):
            trainer.train_step(batches, DataWait())
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        wait = DataWait()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batches, wait)
        _sync(device)
        elapsed = time.perf_counter() - start
        peak_gb, peak_kind = _peak_memory(device)
        busy = _profile(trainer, batches, device, profile) if profile is not None else None
    finally:
        batches.close()
        trainer.logger.close()
    per_step = cfg.data.batch_size * cfg.optim.accum_steps * trainer.env.world_size
    images_per_s = steps * per_step / elapsed
    rates = trainer.throughput.of(images_per_s)
    return {"recipe": cfg.recipe, "model": cfg.model.name, "img_size": trainer.img_size(trainer.data.epoch),
            "batch": cfg.data.batch_size, "accum_steps": cfg.optim.accum_steps, "precision": cfg.engine.precision,
            "compile": trainer.backend.compile, "compile_mode": trainer.backend.compile_mode,
            "compile_scope": trainer.backend.compile_scope, "attention": cfg.engine.attention,
            "device": _device_name(device), "data": data, "decode": getattr(trainer.data, "decode", "cpu"),
            "stage": "thread" if getattr(trainer.data, "stage_thread", False) else "main", "steps": steps,
            "step_ms": 1000 * elapsed / steps, "images_per_s": images_per_s, **rates,
            "peak_tflops": trainer.throughput.peak, "gflops_per_image": trainer.throughput.flops.per_image / 1e9,
            "data_wait_share": min(1.0, wait.seconds / elapsed), "peak_mem_gb": peak_gb, "peak_mem_kind": peak_kind,
            "skipped_steps": trainer.guard.skipped, "device_busy_share": busy}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def run(args: argparse.Namespace) -> int:
    from .flops import step_flops

    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    with tempfile.TemporaryDirectory(prefix="mimscale-bench-step-") as tmp:
        fixed = [f"output.dir={Path(tmp) / 'run'}", "resume=none", "logging.tensorboard=false",
                 "logging.progress=off", "logging.image_every=0", "engine.memory_report_steps=0",
                 f"schedule.max_steps={args.warmup + args.steps}"]
        base = load_config(list(args.overrides) + (MEMORY_DATA if args.data == "memory" else []) + fixed)
        sizes = [int(b) for b in args.batch.split(",")] if args.batch else [base.data.batch_size]
        configs = [apply_overrides(base, [f"data.batch_size={size}"] + (
            [f"data.synthetic_images={size}"] if args.data == "memory" else [])) for size in sizes]
        print(f"mimscale bench step: recipe={base.recipe} model={base.model.name} img={base.model.img_size} "
              f"precision={base.engine.precision} compile={base.engine.compile} data={args.data}, "
              f"{args.warmup} warm-up + {args.steps} timed steps per batch size")
        print(step_flops(configs[0]).table())
        if args.count_only:
            return 0
        rows = []
        for cfg in configs:
            torch._dynamo.reset()  # compiled for the last batch size, dynamo would recompile for this
            # one with dynamic shapes: slower kernels than this size's own
            try:
                profile = None if not args.profile else Path(
                    args.profile if len(configs) == 1 else f"{args.profile}.b{cfg.data.batch_size}")
                rows.append(measure(cfg, args.warmup, args.steps, args.data, profile))
            except torch.OutOfMemoryError:
                rows.append({"model": cfg.model.name, "batch": cfg.data.batch_size, "precision": cfg.engine.precision,
                             "error": "out of memory", **dict.fromkeys(RATES)})
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print("| batch | images/s | step ms | TFLOP/s | MFU | data wait | peak memory GB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['batch']} | {r['error']} | | | | | |")
            continue
        print(f"| {r['batch']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | {r['tflops_per_s']:.3g} | "
              f"{_fmt(r['mfu'], '.1%')} | {r['data_wait_share']:.1%} | {r['peak_mem_gb']:.2f} ({r['peak_mem_kind']}) |")
    write_rows(args.json, rows)
    return 0


def write_rows(path: str | None, rows: list[dict]) -> None:
    """A bench's rows as a JSON list (``--json``), so docs and checks read the printed numbers."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(rows, indent=1) + "\n")
