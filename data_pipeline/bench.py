"""``mimscale bench data``: images/s of every source on the same images, in one run.

The same JPEGs are read as an ImageFolder by plain torchvision (``ImageFolder`` + ``DataLoader``,
MAE's RandomResizedCrop + flip + ToTensor + Normalize: the baseline), and by mimscale's
``imagefolder``, ``wds`` (tar shards holding the same bytes) and ``ffcv`` (a .beton, which ffcv
re-encodes at quality 90) sources, plus ffcv's own loader on that .beton when ffcv is installed.
Every row delivers normalised float32 ``[B, 3, S, S]`` batches with the same worker count (mimscale's
workers ship uint8 and its main process normalises: that work is inside the timing too). Rows are
interleaved round by round, so machine noise hits all alike, and the medians are compared; each
timing starts a fresh loader and drops its first batches (worker start-up, ffcv's compilation).
The consumer only takes batches, so no prefetched backlog inflates a row.
Besides images/s, each row's CPU time per image (the process's threads and its loader workers,
from ``/proc``) is reported: on a shared machine it moves far less with the load than images/s.
Without ``--root`` a synthetic JPEG set is generated once and cached.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from mimscale.errors import UserError

ROWS = ("torchvision", "imagefolder", "wds", "wds-gpu", "ffcv", "ffcv-native")


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", help="an ImageFolder of JPEGs to use (default: generate a synthetic one)")
    p.add_argument("--images", type=int, default=512, help="generated images (default 512)")
    p.add_argument("--image-size", type=_size, default=(500, 375), help="generated WxH (default 500x375, "
                   "ImageNet's most common size)")
    p.add_argument("--img-size", type=int, default=224, help="crop size (default 224)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers, all rows")
    p.add_argument("--batches", type=int, default=24, help="timed batches per row and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--cache", help="where generated data, shards and .beton go (default: the mimscale cache)")
    p.add_argument("--json", help="also write the results here")


# --------------------------------------------------------------------------- data

def _jpeg_job(size, quality, i):
    from PIL import Image

    from .synthetic import CLASSES, sample_at

    w, h = size
    s = sample_at(0, i, max(w, h))
    y0, x0 = (max(w, h) - h) // 2, (max(w, h) - w) // 2
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(s.image[y0:y0 + h, x0:x0 + w])).save(buf, "JPEG", quality=quality)
    return CLASSES[s.label], buf.getvalue()


def synthetic_jpeg_folder(root: Path, n: int, size: tuple[int, int], quality: int = 90,
                          workers: int = 0) -> Path:
    """An ImageFolder of ``n`` generated JPEGs (made once; ``.complete`` marks a finished set)."""
    from functools import partial

    from .shards.common import parallel_map, progress_bar

    marker = root / ".complete"
    if marker.exists():
        return root
    with progress_bar(n, 0, "generate", True) as advance:
        for i, (cls, data) in enumerate(parallel_map(partial(_jpeg_job, size, quality), range(n), workers)):
            (root / cls).mkdir(parents=True, exist_ok=True)
            (root / cls / f"{i:06d}.jpg").write_bytes(data)
            advance()
    marker.write_text("")
    return root


def _prepare(args) -> tuple[Path, Path, Path | None]:
    from .build import cache_dir
    from .shards import ImageFolderInput, write_beton, write_wds
    from .sources.wds import INDEX_NAME, read_member_table, write_member_table

    base = Path(args.cache) if args.cache else cache_dir() / "bench"
    if args.root:
        root = Path(args.root)
        tag = "root_" + hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
    else:
        w, h = args.image_size
        tag = f"jpeg_n{args.images}_{w}x{h}"
        root = synthetic_jpeg_folder(base / tag / "images", args.images, (w, h), workers=args.workers)
    shards = base / tag / "wds"
    index = shards / INDEX_NAME
    if not (index.exists() and json.loads(index.read_text())["mimscale"]["complete"]):
        write_wds(ImageFolderInput(root), shards, max_bytes=64 << 20, workers=args.workers, overwrite=True)
    for tar in sorted(shards.glob("*.tar")):  # shards cached before member tables existed
        if read_member_table(str(tar)) is None:
            write_member_table(str(tar))
    beton = base / tag / "images.beton"
    if {"ffcv", "ffcv-native"} & set(args.rows.split(",")) and not beton.exists():
        try:
            write_beton(ImageFolderInput(root), beton, workers=args.workers)
        except ImportError as e:
            print(f"skipping ffcv rows: {e}")
    return root, index, beton if beton.exists() else None


# --------------------------------------------------------------------------- rows

def _torchvision(root, args):
    import torch
    from torchvision import datasets
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    from .transforms import IMAGENET_MEAN, IMAGENET_STD

    tf = T.Compose([T.RandomResizedCrop(args.img_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root), tf), args.batch_size, shuffle=True,
                                         num_workers=args.workers, drop_last=True,
                                         persistent_workers=args.workers > 0)
    return (x for _ in itertools.count() for x, _ in loader)


def _mimscale(source, args, **options):
    from .loader import PretrainLoader
    from .views import mae_views

    loader = PretrainLoader(source, mae_views(args.img_size), args.batch_size, num_workers=args.workers,
                            remainder="pad", **options)
    return (b["images"] for b in loader)


def _ffcv_native(beton, args):
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToTensor, ToTorchImage

    from .transforms import IMAGENET_MEAN, IMAGENET_STD

    pipe = [RandomResizedCropRGBImageDecoder((args.img_size, args.img_size), scale=(0.2, 1.0)),
            RandomHorizontalFlip(),
            NormalizeImage(np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255, np.float32),
            ToTensor(), ToTorchImage()]
    loader = Loader(str(beton), args.batch_size, num_workers=max(1, args.workers), order=OrderOption.RANDOM,
                    drop_last=True, pipelines={"image": pipe, "label": [IntDecoder(), ToTensor()]})
    return (x for _ in itertools.count() for x, _ in loader)


def _make(row, root, index, beton, args):
    if row == "torchvision":
        return _torchvision(root, args)
    if row == "imagefolder":
        from .sources.imagefolder import ImageFolderSource
        return _mimscale(ImageFolderSource(root), args)
    if row.startswith("wds"):  # wds-gpu: the workers plan, the main process decodes (data.decode=gpu),
        import torch  # on the GPU where there is one, in the staging thread as training would (data.stage=auto)

        from .build import resolve_stage
        from .sources.wds import TarShardSource
        device = "cuda" if torch.cuda.is_available() else "cpu"
        gpu = dict(decode="gpu", device=device, stage=resolve_stage("auto", "gpu", device)) if row == "wds-gpu" else {}
        return _mimscale(TarShardSource(str(index)), args, **gpu)
    if row == "ffcv":
        from .sources.beton import BetonSource
        return _mimscale(BetonSource(beton), args)
    return _ffcv_native(beton, args)


def _cpu_seconds() -> float | None:
    """CPU time of this process (all its threads) and of its live children (loader workers);
    None without Linux's ``/proc``."""
    total, me, tick = time.process_time(), str(os.getpid()), os.sysconf("SC_CLK_TCK")
    try:
        pids = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:  # fields after the command name: state, ppid, ..., utime (12th), stime (13th)
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[1] == me:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _measure(batches, args) -> tuple[float, float | None]:
    """(images/s, CPU ms per image) over ``args.batches`` batches."""
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    n = 0
    for _ in range(args.batches):
        x = next(batches)
        n += x.shape[0]
    if x.is_cuda:  # batches made on the GPU are ready only when its queue has run
        import torch
        torch.cuda.synchronize(x.device)
    seconds, cpu1 = time.perf_counter() - t0, _cpu_seconds()
    assert x.dtype.is_floating_point and x.shape[1:] == (3, args.img_size, args.img_size)
    return n / seconds, (cpu1 - cpu0) * 1e3 / n if cpu0 is not None and cpu1 is not None else None


def _paired(wds: list[float], other: list[float]) -> tuple[float, str]:
    """The median of the per-round ratios wds / other, and a note with their range: rows of one
    round ran back to back, so a ratio within a round cancels slow drifts of the machine's load."""
    ratios = sorted(a / b for a, b in zip(wds, other))
    if len(ratios) < 2:
        return ratios[0], ""
    mid = statistics.median(ratios)
    above = sum(r >= 1 for r in ratios)
    return mid, (f"; per round: median {mid:.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}, "
                 f">= 1 in {above} of {len(ratios)}")


def run(args: argparse.Namespace) -> int:
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise UserError(f"--rows: unknown rows {sorted(unknown)}; valid: {', '.join(ROWS)}")
    root, index, beton = _prepare(args)
    if beton is None:
        rows = [r for r in rows if not r.startswith("ffcv")]
    speeds, cpu = {r: [] for r in rows}, {r: [] for r in rows}
    for _ in range(args.rounds):
        for row in rows:  # a fresh loader, warmed up untimed (worker start-up, ffcv's compilation)
            batches = _make(row, root, index, beton, args)
            for _ in range(args.warmup):
                next(batches)
            speed, ms = _measure(batches, args)
            speeds[row].append(speed)
            cpu[row].append(ms)
            batches.close()
    median = {r: statistics.median(v) for r, v in speeds.items()}
    cpu_median = {r: statistics.median(v) if None not in v else None for r, v in cpu.items()}
    base = median.get("torchvision")
    print(f"mimscale bench data: {root}, {args.img_size}px RandomResizedCrop(0.2, 1) + flip, batch "
          f"{args.batch_size}, {args.workers} workers, {args.batches} timed batches x {args.rounds} rounds "
          "(median)")
    print("| source | images/s | vs torchvision | CPU ms/image | runs (images/s) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = f"{median[r] / base:.2f}x" if base else "-"
        ms = f"{cpu_median[r]:.2f}" if cpu_median[r] is not None else "-"
        print(f"| {r} | {median[r]:.0f} | {ratio} | {ms} | {', '.join(f'{v:.0f}' for v in speeds[r])} |")
    paired = {r: _paired(speeds["wds"], speeds[r]) for r in rows if r != "wds"} if "wds" in speeds else {}
    if base and "wds" in median:
        print(f"wds / torchvision = {median['wds'] / base:.2f} (target >= 1.3){paired['torchvision'][1]}")
        for r in ("ffcv", "ffcv-native"):
            if r in median:
                line = f"wds / {r} = {median['wds'] / median[r]:.2f} (target >= 1){paired[r][1]}"
                if cpu_median[r] and cpu_median["wds"]:
                    line += f"; CPU per image {r} / wds = {cpu_median[r] / cpu_median['wds']:.2f}"
                print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "func"},
                                               "images_per_s": speeds, "median": median,
                                               "cpu_ms_per_image": cpu, "cpu_median": cpu_median,
                                               "wds_paired_ratio": {r: v[0] for r, v in paired.items()}},
                                              indent=1))
    return 0
