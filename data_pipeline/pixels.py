"""Any decoded PIL image to 8-bit RGB, by one rule every reader shares.

Why not ``Image.convert("RGB")`` alone: for high-bit-depth greyscale (a 16-bit PNG opens as
``I;16``) Pillow clips each value to 255 instead of scaling it, so almost every pixel turns white.
The rule here:

- ``I;16`` (and ``I;16B``, ``I;16L``, ``I;16N``): the full 16-bit range maps onto 0-255,
  ``round(v / 257)`` (65535 -> 255, so a 16-bit image looks as its 8-bit version would).
- ``I`` (32-bit integers): values within 0-65535 are 16-bit samples, scaled as ``I;16`` (older
  Pillows and some formats open 16-bit files as ``I``); an image with any value outside that range
  is stretched linearly from its own minimum (0) to its maximum (255).
- ``F`` (32-bit floats): values within 0-1 scale by 255; an image with any value outside 0-1 is
  stretched from its own minimum to its maximum. NaN and infinities count as 0.
- Alpha (``LA``, ``PA``, ``RGBA``, a palette's transparency) is dropped: the stored colour is kept,
  as torchvision's and timm's image loaders do, so pixels match the baselines they are compared to.
- Every other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ...) converts as Pillow does.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as an 8-bit RGB image (``im`` itself when it is RGB already)."""
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
        return Image.fromarray(grey_to_uint8(np.asarray(im), im.mode), "L").convert("RGB")
    with warnings.catch_warnings():  # a palette's transparency is dropped on purpose (see above)
        warnings.filterwarnings("ignore", message="Palette images with Transparency")
        return im.convert("RGB")


def load_rgb(path) -> Image.Image:
    """The image file at ``path``, fully decoded (a damaged file raises here), as 8-bit RGB."""
    with Image.open(path) as im:
        rgb = to_rgb(im)
        return im.copy() if rgb is im else rgb  # a copy outlives the closed file


def grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """One channel of a high-bit-depth ``mode`` (``I;16*``, ``I``, ``F``) as uint8, by the rule above."""
    if mode == "F":
        v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if v.size and (v.min() < 0 or v.max() > 1):
            return _stretch(v)
        return np.rint(v * 255).astype(np.uint8)
    v = values.astype(np.int64)
    if v.size and (v.min() < 0 or v.max() > 65535):
        return _stretch(v)
    return ((v + 128) // 257).astype(np.uint8)  # round(v / 257): 257 is odd, so there are no ties


def _stretch(v: np.ndarray) -> np.ndarray:
    """Linearly from ``v``'s minimum (0) to its maximum (255); a constant image is all 0."""
    lo, hi = float(v.min()), float(v.max())
    return np.rint((v - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)).astype(np.uint8)
