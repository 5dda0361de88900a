"""``mimscale bench masking``: what each strategy costs against MAE, in arithmetic and in time.

For one model size, every strategy row builds its own method and optimizer; each round times, per
row, ``--steps-per-round`` mask-only calls (teacher forward included) and as many whole training
steps (mask, forward, backward, optimizer), each block between two device synchronisations. Rows are
interleaved round by round, starting at another row each round, so machine noise hits all alike.
Per round, a row's step time over the MAE (random masking) step's is its time ratio; the median and
range over the rounds are printed beside the FLOP ratio of the analytic count (``engine.flops``), and
their quotient, the overhead: 1.0 means the strategy costs exactly its arithmetic, more means time
the FLOPs do not explain (small no-grad kernels, host work, padding). Extra memory is the teacher's
parameters, plus on CUDA the peak extra allocation of the scoring pass.

Cached rows (``score_cache.every_epochs=K``): the maps of the bench's images are scored once, and
each step warps them into fixed random crops (half flipped) before selecting, so their mask time is
warp + select. The refresh pass is timed every round as a no-grad scoring pass over the batch, and
its K-th part is added to the row's step time (one pass per image per K epochs), as the FLOP count
adds its K-th part of the scoring FLOPs; the JSON row states it (``refresh_ms``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mimscale.config import load_config
from mimscale.errors import UserError
from mimscale.pretrain.engine.bench_step import _device_name, _sync, write_rows
from mimscale.pretrain.masking.score_cache import CachedBatch

# (label, overrides) of the rows; every strategy, and the variants whose cost differs. The first row
# is MAE, the reference of every ratio.
VARIANTS = [
    ("random (MAE)", ["masking.strategy=random"]),
    ("block", ["masking.strategy=block"]),
    ("idm (online)", ["masking.strategy=idm"]),
    ("idm (momentum)", ["masking.strategy=idm", "teacher.type=ema", "masking.score_source=teacher"]),
    ("gpa (teacher b9)", ["masking.strategy=gpa", "teacher.type=ema", "masking.gpa.head=mean"]),
    ("ccmim (last)", ["masking.strategy=ccmim"]),
    ("ccmim (all_blocks)", ["masking.strategy=ccmim", "masking.ccmim.importance=all_blocks"]),
    ("sbam", ["masking.strategy=sbam"]),
    ("sbam_amr", ["masking.strategy=sbam_amr", "engine.varlen=padded"]),
    ("sbam_amr (packed)", ["masking.strategy=sbam_amr", "engine.varlen=nested"]),
    ("idm (momentum, cache K=20)", ["masking.strategy=idm", "teacher.type=ema", "masking.score_source=teacher",
                                    "masking.score_cache.every_epochs=20"]),
    ("gpa (cache K=20)", ["masking.strategy=gpa", "teacher.type=ema", "masking.gpa.head=mean",
                          "masking.score_cache.every_epochs=20"]),
    ("ccmim (cache K=20)", ["masking.strategy=ccmim", "masking.score_cache.every_epochs=20"]),
    # the whole ccMIM recipe: its masked-set pass (no grad) and contrast heads come on top of the mask
    ("ccmim (with contrast)", ["masking.strategy=ccmim", "objectives.ccmim.weight=0.2"]),
    ("ccmim (with contrast, cache K=20)", ["masking.strategy=ccmim", "objectives.ccmim.weight=0.2",
                                          "masking.score_cache.every_epochs=20"]),
    ("cmae_2shot (random)", ["masking.shots=[{layer: 0.8333, ratio: 0.1}]", "engine.varlen=padded"]),
    ("cmae_2shot (gpa-guided)", ["masking.shots=[{layer: 0.8333, ratio: 0.1, guide: gpa}]", "engine.varlen=padded"]),
    ("cmae_2shot (packed)", ["masking.shots=[{layer: 0.8333, ratio: 0.1}]", "engine.varlen=nested"]),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mae_vit_small_patch16", help="model size (default ViT-S)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--steps-per-round", type=int, default=None,
                   help="steps of each row per round, timed as one block (default 3 on CUDA, 1 on a CPU)")
    p.add_argument("--rows", default=None,
                   help="comma-separated label prefixes of the rows to run (the MAE row always runs)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--varlen", choices=("auto", "nested", "flex", "masked"), default="auto",
                   help="attention kernel of the (packed) rows: auto = nested on CUDA, masked on a CPU "
                        "(flex needs CUDA: no backward on a CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")


def select(names: str | None) -> list[tuple[str, list[str]]]:
    """The VARIANTS whose label starts with one of the comma-separated ``names`` (all when None),
    MAE first in any case."""
    if names is None:
        return list(VARIANTS)
    prefixes = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [p for p in prefixes if not any(label.startswith(p) for label, _ in VARIANTS)]
    if unknown:
        raise UserError(f"--rows: no row starts with {', '.join(map(repr, unknown))}; the rows are: "
                        + ", ".join(label for label, _ in VARIANTS))
    return [VARIANTS[0]] + [(label, o) for label, o in VARIANTS[1:] if any(label.startswith(p) for p in prefixes)]


def _crops(batch: int, size: int, device: torch.device):
    """Fixed random crops (area 0.2–1 of a ``size`` square image, half of them flipped): the
    geometry the cached rows warp their maps with, as ``CachedBatch``'s boxes, sizes, flips."""
    g = torch.Generator().manual_seed(0)
    side = size * torch.empty(batch, 2).uniform_(0.45, 1.0, generator=g)
    corner = (size - side) * torch.rand(batch, 2, generator=g)
    boxes = torch.cat([corner, corner + side], dim=1)
    sizes = torch.full((batch, 2), size)
    flips = torch.rand(batch, generator=g) < 0.5
    return boxes.to(device), sizes.to(device), flips.to(device)


def _timed(steps: int, device: torch.device, fn, *args) -> float:
    """Seconds per call of ``steps`` calls of ``fn(*args)``, synchronised before and after the block only."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(*args)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def run(args: argparse.Namespace) -> int:
    from mimscale.pretrain.engine.flops import packed_step_flops, step_flops
    from mimscale.pretrain.engine.optim import param_groups
    from mimscale.pretrain.method import MIMMethod
    from mimscale.pretrain.models.packed import resolve_varlen

    device = torch.device(args.device)
    steps = args.steps_per_round or (3 if device.type == "cuda" else 1)
    if args.rounds < 1 or args.warmup_rounds < 0 or steps < 1:
        raise UserError("--rounds and --steps-per-round must be >= 1, --warmup-rounds >= 0")
    if args.varlen == "flex" and device.type != "cuda":
        raise UserError("--varlen flex: FlexAttention has no backward on a CPU; use --varlen masked or nested there")
    varlen = resolve_varlen(args.varlen, device)
    base = [f"model.name={args.model}", f"model.img_size={args.img_size}", "data.source=synthetic",
            f"data.batch_size={args.batch}", "optim.accum_steps=1"]
    # smooth images (upsampled 7×7 noise): on white noise SBAM's salience is flat and every AMR image
    # falls back to the centre ratio, so the AMR rows would not be ragged at all
    coarse = torch.randn(args.batch, 3, 7, 7, generator=torch.Generator().manual_seed(0))
    images = torch.nn.functional.interpolate(coarse, size=args.img_size, mode="bicubic").to(device)
    rows, visible, every, kernels = [], {}, {}, {}
    for label, overrides in select(args.rows):
        cfg = load_config(base + [o.replace("varlen=nested", f"varlen={varlen}") for o in overrides])
        torch.manual_seed(0)
        method = MIMMethod(cfg).to(device).train()
        opt = torch.optim.AdamW(param_groups(method, 0.05), lr=1e-4)
        flops = step_flops(cfg)
        if cfg.masking.strategy == "sbam_amr":  # per-image ratios: count this batch's own visible sets
            counts = (~method.make_mask(images, torch.Generator().manual_seed(0)).mask).sum(dim=1).tolist()
            flops, visible[label] = packed_step_flops(cfg, counts), counts
        rows.append((label, method, opt, flops.per_step))
        every[label] = cfg.masking.score_cache.every_epochs
        kernels[label] = cfg.engine.varlen
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    views = _crops(args.batch, args.img_size, device)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def refresh(method):
        with autocast():
            return method.score_maps(images).half()

    cached = {label: CachedBatch(refresh(method), *views) for label, method, *_ in rows if every[label]}

    def mask_only(method, label):
        with autocast():
            method.make_mask(images, torch.Generator().manual_seed(0), cached.get(label))

    def train_step(method, opt, label):
        with autocast():
            out = method(images, torch.Generator().manual_seed(0), cached=cached.get(label))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    mask_t = {label: [] for label, *_ in rows}
    step_t = {label: [] for label, *_ in rows}
    refresh_t = {label: [] for label, *_ in rows}
    for r in range(args.warmup_rounds + args.rounds):
        # each round starts at another row, so no strategy always runs first (after a sync, on an
        # allocator that the previous round left in another state)
        for label, method, opt, _ in rows[r % len(rows):] + rows[:r % len(rows)]:
            m = _timed(steps, device, mask_only, method, label)
            s = _timed(steps, device, train_step, method, opt, label)
            f = _timed(1, device, refresh, method) if every[label] else 0.0
            if r >= args.warmup_rounds:
                mask_t[label].append(m)
                step_t[label].append(s + f / max(1, every[label]))  # the refresh's share of a step
                refresh_t[label].append(f)

    mae, mae_flops = rows[0][0], rows[0][3]
    results = []
    for label, method, _, flops in rows:
        # ratios per round (both steps in the same round, under the same machine state), then the median
        ratios = [s / ref for s, ref in zip(step_t[label], step_t[mae])]
        time_ratio, flop_ratio = statistics.median(ratios), flops / mae_flops
        teacher = sum(p.numel() * p.element_size() for p in method.teacher.parameters()) if method.teacher else 0
        scoring_peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            mask_only(method, label)
            scoring_peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        results.append({
            "row": label, "flop_ratio": flop_ratio, "time_ratio": time_ratio,
            "time_ratio_min": min(ratios), "time_ratio_max": max(ratios), "overhead": time_ratio / flop_ratio,
            "mask_ratio": statistics.median(m / ref for m, ref in zip(mask_t[label], step_t[mae])),
            "step_ms": 1000 * statistics.median(step_t[label]), "mask_ms": 1000 * statistics.median(mask_t[label]),
            "gflops_per_image": flops / args.batch / 1e9, "visible_counts": visible.get(label),
            "varlen": kernels[label],
            "teacher_mib": teacher / 2**20, "scoring_peak_mib": scoring_peak, "cache_every_epochs": every[label] or None,
            "refresh_ms": 1000 * statistics.median(refresh_t[label]) if every[label] else None,
            "model": args.model, "img_size": args.img_size, "batch": args.batch,
            "precision": args.precision, "device": _device_name(device), "rounds": args.rounds,
            "steps_per_round": steps})

    print(f"mimscale bench masking: {args.model} at {args.img_size}px, batch {args.batch}, {args.precision}, "
          f"{_device_name(device)}; {args.rounds} interleaved rounds of {steps} step(s) per row after "
          f"{args.warmup_rounds} warm-up round(s); ratios to one MAE training step (random masking) = "
          f"{results[0]['step_ms']:.1f} ms")
    print("| strategy | mask time / MAE step | FLOP ratio | time ratio (median) | time ratio (min–max) "
          "| overhead | extra memory |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        extra = f"teacher {r['teacher_mib']:.1f} MiB" if r["teacher_mib"] else "none"
        if r["refresh_ms"] is not None:
            extra += (f", refresh {r['refresh_ms']:.1f} ms per batch every {r['cache_every_epochs']} epochs "
                      "(amortised in the time ratio)")
        if r["scoring_peak_mib"] is not None:
            extra += f", scoring peak {r['scoring_peak_mib']:.1f} MiB"
        print(f"| {r['row']} | {r['mask_ratio']:.3f} | {r['flop_ratio']:.3f} | {r['time_ratio']:.3f} | "
              f"{r['time_ratio_min']:.3f}–{r['time_ratio_max']:.3f} | {r['overhead']:.3f} | {extra} |")
    write_rows(args.json, results)
    return 0
