"""JPEGs decoded on the training device (``data.decode=gpu``): workers plan, the main process decodes.

Why: decoding is most of a loader worker's time, and a machine's CPU cores cannot decode as many
images per second as a GPU trains on. Here a worker reads the bytes and draws each view's crop box
and flip from the sample's own random stream with exactly the draws of the CPU path
(``views.plan_views``), so the data order, resume and exactly-once reading are untouched; the batch
carries the JPEG bytes instead of pixels. The main process hands them to
``torchvision.io.decode_jpeg`` as one list (batched nvJPEG on CUDA; libjpeg-turbo when the training
device is the CPU: the same code, which is how the tests run it), then crops, resizes, flips and
normalises on the device.

Geometry: the device decodes at full size, so a view's box is the sampled box itself, whole pixels
of the original. The CPU path with ``fast_decode`` decodes at a DCT scale and rounds the box to the
decoded grid: its box is ``round(b * s) / s`` of this one per axis (``s`` = decoded / original
size), and equal to it with ``fast_decode=false``.

Pixels: the antialiased bicubic filter (PIL's weights, as ``F.interpolate(..., antialias=True)``)
applied as two batched matmuls per chunk of images (``_resample_into``), in float32, then rounded and
clamped to uint8 levels as the worker's uint8 kernel does. Against the CPU path at full size the views differ
by at most 2 levels, 0.1-0.2 on average (the fixed-point kernel also rounds between its two passes);
against its DCT-scaled decode by the difference between the two downscales (tests/test_gpu_decode.py
states the bounds).

What the device does not take is decoded in the worker as before: anything but a YCbCr or greyscale
JPEG (PNG, CMYK, raw pixels), a JPEG whose header does not parse, or one that does not end with its
EOI marker (truncated). A JPEG that still fails on the device is a bad sample: reported to the
loader, which counts it as the worker's, and replaced by a good sample of the same batch.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from mimscale.errors import DataError

from .views import _device_constants, host_to, jpeg_size, plan_views

_EOI = b"\xff\xd9"


def device_ready(specs) -> bool:
    """Whether the device can make these views: random crops and flips only (the colour operations
    of MoCo v3's views and centre crops stay in the worker)."""
    return all(s.crop == "random" and not (s.jitter_p or s.gray_p or s.blur_p or s.solarize_p)
               for s in specs)


@dataclass
class Deferred:
    """A sample whose views the main process decodes: its bytes and each view's geometry, as the
    worker's ``views.Views`` has them."""
    data: bytes
    boxes: list[tuple[float, float, float, float]]  # x0, y0, x1, y1 in original pixels (integers)
    flips: list[bool]
    original_size: tuple[int, int]  # (height, width)


def defer_views(data: bytes, specs, rng: random.Random, shape=None) -> Deferred | None:
    """The sample's views planned for the device, or None (nothing drawn from ``rng``) when the
    worker must decode it."""
    if shape is not None or data[-2:] != _EOI:
        return None
    size = jpeg_size(data)
    if size is None:
        return None
    width, height = size
    plans = plan_views(width, height, specs, rng)
    return Deferred(data, [(float(x), float(y), float(x + w), float(y + h)) for _, (x, y, w, h), _ in plans],
                    [flip for *_, flip in plans], (height, width))


def collate_encoded(samples: list, num_views: int, empty) -> dict:
    """The pixel part of a worker's batch when some samples are ``Deferred``: their bytes in one
    uint8 tensor (``jpeg``, split by ``jpeg_lengths``, batch rows ``jpeg_rows``), and the views of
    the rest as decoded in the worker (``worker_views``, rows ``worker_rows``). ``empty(shape)``
    allocates a uint8 tensor (in shared memory, in a worker)."""
    rows = [i for i, s in enumerate(samples) if isinstance(s, Deferred)]
    lengths = [len(samples[i].data) for i in rows]
    data = empty((sum(lengths),))
    flat, at = data.numpy(), 0
    for i, n in zip(rows, lengths):
        flat[at:at + n] = np.frombuffer(samples[i].data, np.uint8)
        at += n
    out = {"jpeg": data, "jpeg_lengths": torch.tensor(lengths, dtype=torch.long),
           "jpeg_rows": torch.tensor(rows, dtype=torch.long)}
    others = [i for i, s in enumerate(samples) if not isinstance(s, Deferred)]
    if others:
        out["worker_rows"] = torch.tensor(others, dtype=torch.long)
        views = []
        for j in range(num_views):
            first = samples[others[0]].images[j]
            view = empty((len(others), *first.shape))
            for dst, i in zip(view, others):
                dst.copy_(samples[i].images[j])
            views.append(view)
        out["worker_views"] = views
    return out


def decode_batch(batch: dict, specs, device: torch.device) -> tuple[list[torch.Tensor], list[tuple[int, str]]]:
    """Pops the encoded part of a worker's batch (``collate_encoded``); returns each view as
    normalised float32 ``[B, 3, S, S]`` on ``device`` and ``(row, reason)`` of each sample that failed
    to decode here, whose row (pixels, boxes, flips, sizes, index, labels) now repeats a good one's."""
    data, lengths, rows = batch.pop("jpeg"), batch.pop("jpeg_lengths").tolist(), batch.pop("jpeg_rows").tolist()
    worker_rows, worker_views = batch.pop("worker_rows", None), batch.pop("worker_views", None)
    sizes = batch["sizes"].tolist()
    images, bad = _decode(list(torch.split(data, lengths)), [tuple(sizes[r]) for r in rows], device)
    size = len(batch["index"])
    scale, shift = _device_constants(device)
    views = [torch.empty((size, 3, spec.size, spec.size), dtype=torch.float32, device=device) for spec in specs]
    _resample_into(views, [(r, img) for r, img in zip(rows, images) if img is not None],
                   batch["boxes"], batch["flips"], device)
    for j, out in enumerate(views):
        if worker_rows is not None:
            out.index_copy_(0, host_to(worker_rows, device), host_to(worker_views[j], device).float())
        out.clamp_(0, 255).round_().mul_(scale).add_(shift)
    failed = [r for r, img in zip(rows, images) if img is None]
    reasons = list(zip(failed, bad))
    if failed:
        _stand_in(batch, views, failed)
    return views, reasons


_CHUNK_BYTES = 128 << 20  # float32 pixels resampled at once, at most (more images go in several chunks)


def _resample_into(views: list[torch.Tensor], decoded: list[tuple[int, torch.Tensor]], boxes: torch.Tensor,
                   flips: torch.Tensor, device: torch.device) -> None:
    """Writes each view of each decoded image into its batch row: the view's box of the uint8
    ``[3, H, W]`` image resized to the view's size with the antialiased bicubic filter (float32, not
    yet rounded), flipped where drawn. ``boxes`` ``[B, V, 4]`` and ``flips`` ``[B, V]`` are the batch's.

    Why matrices: the filter is separable, so a view is ``Wy · image · Wxᵀ`` with one weight matrix
    per axis that is zero outside the box (and mirrored for a flip). A chunk of images then goes
    through two batched matmuls for all their views, a few dozen kernels, where ``F.interpolate``
    on each crop costs several kernel launches per image and view, host time that grows with the
    batch. Images of other sizes share a chunk on a canvas of the largest (what lies outside an
    image is outside its boxes: weight zero); sorted by size, so that similar sizes share one. The
    arithmetic is more (every canvas pixel, not just the filter's taps), which a GPU's matmul
    units absorb."""
    for part in _chunks(sorted(decoded, key=lambda item: tuple(item[1].shape[1:]))):
        rows = torch.tensor([r for r, _ in part], dtype=torch.long)
        height, width = (max(img.shape[i] for _, img in part) for i in (1, 2))
        pixels = _canvas([img for _, img in part], height, width).float()  # [n, 3, H, W]
        geometry = host_to(torch.cat([boxes[rows].flatten(1), flips[rows].float()], 1), device)  # [n, 5V]
        rows = host_to(rows, device)
        for j, out in enumerate(views):
            box, flip = geometry[:, 4 * j:4 * j + 4], geometry[:, 4 * len(views) + j] > 0
            wy = resize_weights(box[:, 1], box[:, 3], height, out.shape[-2])  # [n, S, H]
            wx = resize_weights(box[:, 0], box[:, 2], width, out.shape[-1])  # [n, S, W]
            wx = torch.where(flip[:, None, None], wx.flip(1), wx)
            out.index_copy_(0, rows, wy[:, None] @ (pixels @ wx.transpose(1, 2)[:, None]))


def _chunks(items: list[tuple[int, torch.Tensor]]):
    """Consecutive runs of ``items`` whose canvas (count x the largest height x the largest width)
    holds at most ``_CHUNK_BYTES`` of float32 pixels (at least one image each)."""
    part, height, width = [], 0, 0
    for item in items:
        h, w = max(height, item[1].shape[1]), max(width, item[1].shape[2])
        if part and (len(part) + 1) * 3 * h * w * 4 > _CHUNK_BYTES:
            yield part
            part, h, w = [], item[1].shape[1], item[1].shape[2]
        part.append(item)
        height, width = h, w
    if part:
        yield part


def _canvas(images: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """The uint8 images stacked ``[n, 3, height, width]``, each in the top-left corner (one kernel
    when they all have that size, else one copy each)."""
    if all(img.shape[1:] == (height, width) for img in images):
        return torch.stack(images)
    out = images[0].new_zeros((len(images), 3, height, width))
    for dst, img in zip(out, images):
        dst[:, :img.shape[1], :img.shape[2]] = img
    return out


def resize_weights(start: torch.Tensor, stop: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """``[n, out_size, in_size]`` float32: row ``i`` of matrix ``b`` holds the weights of output pixel
    ``i`` over the input pixels when ``[start_b, stop_b)`` (whole pixels) is resized to ``out_size``
    with the antialiased bicubic filter (PIL's, as ``F.interpolate(..., antialias=True)``: cubic with
    ``a = -0.5``, stretched by the downscale factor, normalised per output pixel); zero outside the
    range."""
    start, length = start.float()[:, None, None], (stop - start).float()[:, None, None]
    scale = length / out_size
    stretch = scale.clamp(min=1)  # downscaling widens the filter; upscaling does not narrow it
    centre = scale * (torch.arange(out_size, device=start.device, dtype=torch.float32)[None, :, None] + 0.5)
    x = torch.arange(in_size, device=start.device, dtype=torch.float32)[None, None, :] - start  # in the range
    lo = torch.trunc(centre - 2 * stretch + 0.5).clamp(min=0)  # the taps F.interpolate visits
    hi = torch.minimum(torch.trunc(centre + 2 * stretch + 0.5), length)
    t = ((x - centre + 0.5) / stretch).abs()
    cubic = torch.where(t < 1, (1.5 * t - 2.5) * t * t + 1, ((-0.5 * t + 2.5) * t - 4) * t + 2)
    w = torch.where((x >= lo) & (x < hi) & (t < 2), cubic, 0.0)
    return w / w.sum(-1, keepdim=True)


def _decode(chunks: list[torch.Tensor], sizes: list[tuple[int, int]], device: torch.device):
    """Each JPEG decoded to uint8 RGB ``[3, H, W]`` on ``device`` (one batched call; one call per
    image when that fails, so one damaged image does not take the others); None where it fails or
    its size is not the header's. Also the failures' messages."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def call(items):
        with warnings.catch_warnings():  # torchvision announces TorchCodec as the successor
            warnings.simplefilter("ignore", DeprecationWarning)
            if device.type != "cuda":
                return decode_jpeg(items, mode=ImageReadMode.RGB, device=device)
            side = _decode_stream(device)
            with torch.cuda.stream(side):
                images = decode_jpeg(items, mode=ImageReadMode.RGB, device=device)
            return _hand_over(images, side, device)

    if not chunks:
        return [], []
    try:
        images = call(chunks)
    except (RuntimeError, ValueError):
        images = []
        for chunk in chunks:
            try:
                images.extend(call([chunk]))
            except (RuntimeError, ValueError) as e:
                images.append(e)
    out, bad = [], []
    for img, (height, width) in zip(images, sizes):
        if isinstance(img, Exception) or tuple(img.shape[1:]) != (height, width):
            why = img if isinstance(img, Exception) else f"decoded {tuple(img.shape[1:])}, header {(height, width)}"
            bad.append(f"undecodable on {device.type}: {(str(why).splitlines() or [repr(why)])[-1]}")
            img = None
        out.append(img)
    return out, bad


_DECODE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _decode_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream nvJPEG's output tensors are allocated under, one per device.

    Why: torchvision allocates the decoded images under the caller's current stream, then has
    nvJPEG write them from a private stream that does not wait for the caller's. The caching
    allocator hands out a block as soon as it is freed on its stream, so under the training stream
    the decoder can be given memory that the step still being computed there (the loader decodes
    the next batch during the backward pass) has yet to read, and overwrite it: wrong values or a
    device-side index assert far from the decoder (pytorch/vision PR 9606, torchcodec PR 1634). A
    block of this stream's own pool is free only once every stream that used it is done with it.
    """
    device = torch.device(device.type, torch.cuda.current_device() if device.index is None else device.index)
    if device not in _DECODE_STREAMS:
        _DECODE_STREAMS[device] = torch.cuda.Stream(device)
    return _DECODE_STREAMS[device]


def _hand_over(images: list[torch.Tensor], side: "torch.cuda.Stream", device: torch.device) -> list[torch.Tensor]:
    """Images decoded under ``side``, made safe to use on the current stream: it waits for them,
    and their memory returns to ``side``'s pool only after the current stream's work on them ran."""
    current = torch.cuda.current_stream(device)
    current.wait_stream(side)
    for img in images:
        img.record_stream(current)
    return images


def _stand_in(batch: dict, views: list[torch.Tensor], failed: list[int]) -> None:
    """Each failed row takes the previous good row of the batch, else the next one (the worker's
    rule, within the batch)."""
    failed_set, size = set(failed), len(batch["index"])
    good = [r for r in range(size) if r not in failed_set]
    if not good:
        raise DataError(f"no sample of a batch of {size} could be decoded on the device")
    for r in failed:
        src = max((g for g in good if g < r), default=None)
        src = min(g for g in good if g > r) if src is None else src
        for key in ("boxes", "flips", "sizes", "index", "labels"):
            batch[key][r] = batch[key][src]
        for view in views:
            view[r] = view[src]
