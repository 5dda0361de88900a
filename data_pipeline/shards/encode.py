"""What a writer stores for one image: the original bytes, or a smaller JPEG.

Why re-encode at all: decoding dominates a loader's cost and grows with the pixel count, so
bounding the longer side (FFCV stores ImageNet at 512 or less) and fixing the JPEG quality makes
every later epoch cheaper. Without those options the original file is stored untouched, after a
check that it decodes (a file that does not is skipped and reported, never written).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..pixels import to_rgb

EXT_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "PPM": "ppm"}


def decode_rgb(data: bytes, max_side: int | None = None) -> Image.Image:
    """Decode fully (raising on damaged data), at a reduced DCT scale when ``max_side`` allows."""
    im = Image.open(io.BytesIO(data))
    if max_side and im.format == "JPEG":
        scale = max_side / max(im.size)
        if scale < 1:
            im.draft("RGB", (int(im.width * scale) + 1, int(im.height * scale) + 1))
    im.load()
    return to_rgb(im)


def check_decodable(data: bytes) -> str:
    """The file extension for ``data`` if it decodes completely; raises otherwise."""
    if not data:
        raise ValueError("zero-byte file")
    im = Image.open(io.BytesIO(data))
    fmt = im.format
    if fmt == "JPEG":
        im.draft("RGB", (1, 1))  # 1/8 scale: still reads every byte, so truncation is caught
    im.load()
    if fmt not in EXT_OF_FORMAT:
        raise ValueError(f"unsupported image format {fmt}; supported: {', '.join(EXT_OF_FORMAT)}")
    return EXT_OF_FORMAT[fmt]


def shrink(im: Image.Image, max_side: int | None) -> Image.Image:
    if max_side and max(im.size) > max_side:
        scale = max_side / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(size, Image.LANCZOS, reducing_gap=3.0)
    return im


def encode_image(data: bytes | np.ndarray, max_side: int | None = None,
                 quality: int | None = None) -> tuple[bytes, str]:
    """``(bytes, extension)`` to store: untouched bytes, or a JPEG when re-encoding is asked for.

    Raw pixels (``uint8 [H, W, 3]``, e.g. generated images) become PNG, or JPEG with ``quality``.
    """
    if isinstance(data, np.ndarray):
        im = shrink(Image.fromarray(data), max_side)
        return _save(im, quality) if quality else _save_png(im)
    if not (max_side or quality):
        return data, check_decodable(data)
    if not data:
        raise ValueError("zero-byte file")
    return _save(shrink(decode_rgb(data, max_side), max_side), quality or 90)


def _save(im: Image.Image, quality: int) -> tuple[bytes, str]:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), "jpg"


def _save_png(im: Image.Image) -> tuple[bytes, str]:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue(), "png"
