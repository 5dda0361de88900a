"""``mimscale bench masking``: the cost of producing each strategy's mask, measured in one run.

For one model size, every strategy's mask time per step (teacher forward included) and its whole
training step are timed against one MAE training step with random masking (forward, backward,
optimizer), interleaved round by round so that machine noise hits all of them alike; the medians'
ratios are printed. Extra memory is the teacher's parameters, plus on CUDA the peak extra
allocation of the scoring pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mimscale.config import load_config

# (label, overrides) of the rows; every strategy, and the variants whose cost differs
VARIANTS = [
    ("random (MAE)", ["masking.strategy=random"]),
    ("block", ["masking.strategy=block"]),
    ("idm (online)", ["masking.strategy=idm"]),
    ("idm (momentum)", ["masking.strategy=idm", "teacher.type=ema", "masking.score_source=teacher"]),
    ("gpa (teacher b9)", ["masking.strategy=gpa", "teacher.type=ema", "masking.gpa.head=mean"]),
    ("ccmim (last)", ["masking.strategy=ccmim"]),
    ("ccmim (all_blocks)", ["masking.strategy=ccmim", "masking.ccmim.importance=all_blocks"]),
    ("sbam", ["masking.strategy=sbam"]),
    ("sbam_amr", ["masking.strategy=sbam_amr"]),
    ("cmae 2-shot (random)", ["masking.shots=[{layer: 0.8333, ratio: 0.1}]"]),
    ("cmae 2-shot (gpa-guided)", ["masking.shots=[{layer: 0.8333, ratio: 0.1, guide: gpa}]"]),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mae_vit_small_patch16", help="model size (default ViT-S)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _time(fn, device: torch.device, *args) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    from mimscale.pretrain.engine.optim import param_groups
    from mimscale.pretrain.method import MIMMethod

    device = torch.device(args.device)
    base = [f"model.name={args.model}", f"model.img_size={args.img_size}", "data.source=synthetic"]
    rows = []
    for label, overrides in VARIANTS:
        cfg = load_config(base + overrides)
        torch.manual_seed(0)
        method = MIMMethod(cfg).to(device).train()
        opt = torch.optim.AdamW(param_groups(method, 0.05), lr=1e-4)
        rows.append((label, method, opt))
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def mask_only(method):
        with autocast():
            method.make_mask(images, torch.Generator().manual_seed(0))

    def train_step(method, opt):
        with autocast():
            out = method(images, torch.Generator().manual_seed(0))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    mask_t = {label: [] for label, _, _ in rows}
    step_t = {label: [] for label, _, _ in rows}
    for r in range(args.rounds + 1):  # round 0 warms up
        # each round starts at another row, so no strategy always runs first (after a sync, on an
        # allocator that the previous round left in another state)
        for label, method, opt in rows[r % len(rows):] + rows[:r % len(rows)]:
            m = _time(mask_only, device, method)
            s = _time(train_step, device, method, opt)
            if r:
                mask_t[label].append(m)
                step_t[label].append(s)
    mae_step = statistics.median(step_t[rows[0][0]])
    print(f"mimscale bench masking: {args.model} at {args.img_size}px, batch {args.batch}, {args.precision}, "
          f"{device}, median of {args.rounds} interleaved rounds; ratios to one MAE training step "
          f"(random masking) = {1000 * mae_step:.0f} ms")
    print("| strategy | mask time / MAE step | training step / MAE step | extra memory |")
    print("| --- | --- | --- | --- |")
    for label, method, _ in rows:
        teacher = sum(p.numel() * p.element_size() for p in method.teacher.parameters()) if method.teacher else 0
        extra = f"teacher {teacher / 2**20:.1f} MiB" if teacher else "none"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            mask_only(method)
            extra += f", scoring peak {(torch.cuda.max_memory_allocated() - before) / 2**20:.1f} MiB"
        print(f"| {label} | {statistics.median(mask_t[label]) / mae_step:.3f} | "
              f"{statistics.median(step_t[label]) / mae_step:.2f} | {extra} |")
    return 0
