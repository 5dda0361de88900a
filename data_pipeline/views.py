"""Decode an encoded image into augmented views and the geometry that made each one.

Why not torchvision transforms here: the crop must be known *before* decoding, so a JPEG is decoded
at the smallest DCT scale (1/2, 1/4, 1/8) that still covers every view's crop at full output
resolution, and then cropped and resized in one resampling pass. That is the cheap part of FFCV's
speed, without its file format. JPEGs are decoded by ``simplejpeg`` when it is installed
(``mimscale[simplejpeg]``): the same libjpeg-turbo as PIL's, same pixels, but straight into a numpy
array, which saves PIL's copy of every decoded image (a fifth of a decode); PIL decodes the rest and
whatever simplejpeg refuses. Every random draw comes from the ``random.Random`` passed in, which the
loader seeds per sample, so a view does not depend on which worker made it.

A view's geometry is its crop box ``(x0, y0, x1, y1)`` in pixels of the original image and
whether it was flipped, so a score map or a mask can be related back to the image.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import functional as TF

from .pixels import to_rgb
from .transforms import IMAGENET_MEAN, IMAGENET_STD

try:
    import simplejpeg
except ImportError:  # optional: PIL decodes everything
    simplejpeg = None


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view. Defaults are MAE's: random resized crop (0.2, 1), bicubic, flip."""
    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop: str = "random"  # "center": a centred square of ``crop_pct`` of the short side; "full": the whole image
    crop_pct: float = 0.875
    flip_p: float = 0.5
    jitter_p: float = 0.0  # colour jitter (brightness, contrast, saturation, hue) in random order
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


def mae_views(img_size: int, scale=(0.2, 1.0), hflip: bool = True) -> tuple[ViewSpec, ...]:
    return (ViewSpec(img_size, tuple(scale), flip_p=0.5 if hflip else 0.0),)


def mocov3_views(img_size: int, scale=(0.08, 1.0)) -> tuple[ViewSpec, ...]:
    """MoCo v3's asymmetric pair: both jittered and greyed; blur always / rarely, solarize never / sometimes."""
    common = dict(size=img_size, scale=tuple(scale), jitter_p=0.8, gray_p=0.2)
    return (ViewSpec(**common, blur_p=1.0), ViewSpec(**common, blur_p=0.1, solarize_p=0.2))


def eval_views(img_size: int, crop_pct: float = 0.875) -> tuple[ViewSpec, ...]:
    """The evaluation view: resize the short side to ``img_size / crop_pct``, centre crop, no flip."""
    return (ViewSpec(img_size, crop="center", crop_pct=crop_pct, flip_p=0.0),)


VIEW_SETS = {"mae": mae_views, "mocov3": mocov3_views}


def size_at(phases, epoch: int, default: int) -> int:
    """The image size of ``epoch`` in a resolution schedule of ``(first epoch, size)`` phases in
    ascending order (``schedule.resolution``); ``default`` when there are none."""
    size = default
    for start, phase_size in phases:
        if epoch >= start:
            size = phase_size
    return size


def views_at(specs, phases, epoch: int) -> tuple[ViewSpec, ...]:
    """The views of ``epoch``: ``specs`` at the size of its phase of ``phases`` (as ``size_at``)."""
    size = size_at(phases, epoch, specs[0].size)
    return tuple(spec if spec.size == size else replace(spec, size=size) for spec in specs)


def sample_crop(width: int, height: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """Random resized crop ``(x0, y0, w, h)``: area fraction in ``scale``, log-uniform aspect in
    ``ratio``, ten tries, then the largest centred crop whose aspect is clamped into ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop(width: int, height: int, size: int, crop_pct: float) -> tuple[float, float, float, float]:
    """The box of the original that torchvision's ``Resize(round(size / crop_pct))`` +
    ``CenterCrop(size)`` keep, with their rounding, as ``(x0, y0, w, h)``."""
    short = round(size / crop_pct)
    if width <= height:
        rw, rh = short, int(short * height / width)
    else:
        rw, rh = int(short * width / height), short
    left, top = int(round((rw - size) / 2)), int(round((rh - size) / 2))
    sx, sy = width / rw, height / rh
    return left * sx, top * sy, min(size, rw) * sx, min(size, rh) * sy


@dataclass
class Views:
    images: list[torch.Tensor]  # uint8 [3, size, size] per view
    boxes: list[tuple[float, float, float, float]]  # x0, y0, x1, y1 in original pixels
    flips: list[bool]
    original_size: tuple[int, int]  # (height, width)


def decode_views(data: bytes, specs, rng: random.Random, shape: tuple[int, int] | None = None,
                 fast: bool = True) -> Views:
    """Decode ``data`` (an encoded image, or raw RGB of ``shape``) into one view per spec.

    Random crops are resampled by torch's uint8 antialiased bicubic kernel (the same filter as
    PIL's, several times faster) on the decoded pixel grid: after DCT scaling, a box is rounded to
    whole decoded pixels and the box reported is the one actually used. Centre crops keep
    torchvision's exact fractional box (PIL). Raises on undecodable or truncated data.
    """
    image = _Encoded(data, shape)
    width, height = image.size
    plans = plan_views(width, height, specs, rng)
    scale = 1
    if fast and image.is_jpeg:
        # The smallest decode in which every crop still spans at least ``size`` pixels.
        need_w = max(math.ceil(width * s.size / max(b[2], 1)) for s, b, _ in plans)
        need_h = max(math.ceil(height * s.size / max(b[3], 1)) for s, b, _ in plans)
        scale = dct_scale(width, height, need_w, need_h)
    pixels = image.decode(scale)
    dec_h, dec_w = pixels.shape[1:]
    sx, sy = dec_w / width, dec_h / height
    out = Views([], [], [], (height, width))
    for spec, (x, y, w, h), flip in plans:
        if spec.crop == "center":
            box = (x * sx, y * sy, min((x + w) * sx, dec_w), min((y + h) * sy, dec_h))
            view = torch.from_numpy(np.array(image.pil().resize((spec.size, spec.size), Image.BICUBIC, box=box)))
            view = view.permute(2, 0, 1)
            used = (x, y, x + w, y + h)
        else:
            x0, y0 = min(round(x * sx), dec_w - 1), min(round(y * sy), dec_h - 1)
            x1, y1 = max(min(round((x + w) * sx), dec_w), x0 + 1), max(min(round((y + h) * sy), dec_h), y0 + 1)
            # a compact channels-last crop takes torch's vectorised path (a strided one: a slower copy)
            crop = pixels[None, :, y0:y1, x0:x1].contiguous(memory_format=torch.channels_last)
            view = F.interpolate(crop, size=(spec.size, spec.size), mode="bicubic", antialias=True)[0]
            used = (x0 / sx, y0 / sy, x1 / sx, y1 / sy)
        if flip:
            view = view.flip(-1)
        out.images.append(_colour(view, spec, rng))
        out.boxes.append(tuple(float(v) for v in used))
        out.flips.append(flip)
    return out


def plan_views(width: int, height: int, specs, rng: random.Random) -> list:
    """Each view's ``(spec, (x0, y0, w, h), flip)`` in pixels of the original: the crop and flip
    draws, in their order, shared by the worker's decode and the device decode (``gpu_decode``)."""
    plans = []
    for spec in specs:
        if spec.crop == "center":
            box = center_crop(width, height, spec.size, spec.crop_pct)
        elif spec.crop == "full":  # the whole image squeezed to a square (the score cache's view)
            box = (0, 0, width, height)
        else:
            box = sample_crop(width, height, spec.scale, spec.ratio, rng)
        plans.append((spec, box, rng.random() < spec.flip_p))
    return plans


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a YCbCr or greyscale JPEG from its header; None for anything else
    (another format, CMYK, an unreadable header). Reads no pixels."""
    if data[:2] != b"\xff\xd8":
        return None
    if simplejpeg is not None:
        return _simplejpeg_header(data)
    try:
        im = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - any unreadable header: not for the device
        return None
    return im.size if im.format == "JPEG" and im.mode in ("RGB", "L") else None


def dct_scale(width: int, height: int, need_w: int, need_h: int) -> int:
    """The JPEG downscale (8, 4, 2 or 1) that keeps at least ``need_w x need_h`` pixels: PIL's
    ``draft`` rule, so both decoders produce the same pixel grid."""
    fits = min(width // max(need_w, 1), height // max(need_h, 1))
    return next((s for s in (8, 4, 2) if fits >= s), 1)


class _Encoded:
    """An encoded image whose size is known before its pixels are decoded (at a DCT scale)."""

    def __init__(self, data: bytes, shape: tuple[int, int] | None):
        self.data, self._pil, self._pixels = data, None, None
        header = _simplejpeg_header(data) if shape is None else None
        if header is not None:
            self.size, self.is_jpeg = header, True
            return
        if shape is not None:
            self._pil = Image.frombuffer("RGB", (shape[1], shape[0]), data, "raw", "RGB", 0, 1)
        else:
            self._pil = Image.open(io.BytesIO(data))
        self.size, self.is_jpeg = self._pil.size, self._pil.format == "JPEG"

    def decode(self, scale: int) -> torch.Tensor:
        """The pixels, downscaled by ``scale``, as a uint8 ``[3, H, W]`` view of channels-last memory."""
        if self._pil is None:
            width, height = self.size
            try:
                self._pixels = simplejpeg.decode_jpeg(self.data, "RGB", min_height=-(-height // scale),
                                                      min_width=-(-width // scale))
                return torch.from_numpy(self._pixels).permute(2, 0, 1)
            except ValueError:  # damaged: PIL decodes what it can, or raises its usual error
                self._pil = Image.open(io.BytesIO(self.data))
        if scale > 1:
            self._pil.draft("RGB", (self.size[0] // scale, self.size[1] // scale))
        self._pil = to_rgb(self._pil)  # 16-bit images scaled, not clipped to white
        return _chw(self._pil)

    def pil(self) -> Image.Image:
        """The decoded pixels (after ``decode``) as a PIL image, for PIL's resampling (centre crops)."""
        if self._pil is None:
            self._pil = Image.fromarray(self._pixels)
        return self._pil


def _simplejpeg_header(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG that simplejpeg decodes exactly as PIL (YCbCr or grey);
    None for anything else (no simplejpeg, not a JPEG, CMYK, an unreadable header)."""
    if simplejpeg is None or data[:2] != b"\xff\xd8":
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (width, height) if colorspace in ("YCbCr", "Gray") else None


def _chw(im: Image.Image) -> torch.Tensor:
    """The decoded pixels as a uint8 ``[3, H, W]`` view (channels last in memory), no copy."""
    with warnings.catch_warnings():  # read-only buffer: we never write to it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(im)).permute(2, 0, 1)


def _colour(view: torch.Tensor, spec: ViewSpec, rng: random.Random) -> torch.Tensor:
    """MoCo v3's colour operations, on a PIL copy of the view (only views that have them)."""
    if not (spec.jitter_p or spec.gray_p or spec.blur_p or spec.solarize_p):
        return view
    im = Image.fromarray(view.permute(1, 2, 0).numpy())
    if spec.jitter_p and rng.random() < spec.jitter_p:
        b, c, s, h = spec.jitter
        ops = [(TF.adjust_brightness, rng.uniform(1 - b, 1 + b)),
               (TF.adjust_contrast, rng.uniform(1 - c, 1 + c)),
               (TF.adjust_saturation, rng.uniform(1 - s, 1 + s)),
               (TF.adjust_hue, rng.uniform(-h, h))]
        for i in rng.sample(range(4), 4):
            fn, factor = ops[i]
            im = fn(im, factor)
    if spec.gray_p and rng.random() < spec.gray_p:
        im = im.convert("L").convert("RGB")
    if spec.blur_p and rng.random() < spec.blur_p:
        im = im.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*spec.blur_sigma)))
    if spec.solarize_p and rng.random() < spec.solarize_p:
        im = ImageOps.solarize(im, 128)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


_SCALE = (1 / (np.array(IMAGENET_STD, np.float32) * 255)).reshape(3, 1, 1)
_SHIFT = (-np.array(IMAGENET_MEAN, np.float32) / np.array(IMAGENET_STD, np.float32)).reshape(3, 1, 1)


def host_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory, without blocking the host (a copy
    from pageable memory would be a host sync)."""
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def normalize_uint8_on(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> ImageNet-normalised float32 on ``device``. For a GPU the uint8 batch
    is pinned and copied without blocking, then normalised there (a quarter of the bytes cross the
    bus and the host does no arithmetic)."""
    scale, shift = _device_constants(device)
    return host_to(x, device).float().mul_(scale).add_(shift)  # the host's operations in its order: the same floats


_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _device_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normaliser's scale and shift on ``device``. On CUDA one copy per stream: the copy is
    asynchronous (no host sync, even the first time), so only work queued behind it on the same
    stream may read it (the staging thread, ``stage.py``, has a stream of its own)."""
    key = (device, torch.cuda.current_stream(device).cuda_stream) if device.type == "cuda" else (device,)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = tuple(host_to(torch.from_numpy(c), device) for c in (_SCALE, _SHIFT))
    return _CONSTANTS[key]


def normalize_uint8(x, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` (or a list of ``[3, H, W]``) -> ImageNet-normalised float32, into
    ``out`` if given.

    ``x / 255 * (1 / std) - mean / std``: one multiply that converts, one add in place. numpy's
    kernels run on one thread whatever torch's setting: in a process whose cores are busy with
    loader workers, torch's parallel kernels spend more time waiting for each other than working."""
    if not isinstance(x, torch.Tensor):
        x = torch.stack(list(x))
    if out is None:
        out = torch.empty(x.shape)
    dst = out.numpy()
    np.multiply(x.numpy(), _SCALE, out=dst, casting="unsafe")
    np.add(dst, _SHIFT, out=dst)
    return out
