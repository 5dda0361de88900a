"""Bad samples in words, and the run folder's list of them.

Why: a decoder's exception (``UnidentifiedImageError('cannot identify image file <_io.BytesIO
object at 0x7f…>')``) names neither the file nor what is wrong with it. A user fixing or dropping
data needs the shard, the key and the problem in words ("truncated JPEG", "empty file"), and,
after a long run, all of them in one file rather than scattered through a log.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import UnidentifiedImageError

# (leading bytes, format): enough to name what a file meant to be when its decoder gives up
_MAGIC = (
    (b"\xff\xd8", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"),
)
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class BadSample:
    """One unreadable sample: where it lives and why it was skipped."""
    shard: str   # the shard, file or folder it comes from
    key: str     # its name inside ``shard``
    reason: str  # what is wrong, in words

    def __str__(self) -> str:
        return f"{self.shard} key {self.key}: {self.reason}"


def image_format(data: bytes) -> str | None:
    """The format ``data`` announces by its first bytes (JPEG, PNG, ...), None if none we know."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def decode_reason(data: bytes | None, error: BaseException) -> str:
    """Why ``data`` could not be decoded, in words, from the bytes and the decoder's ``error``."""
    if not data:
        return "empty file"
    fmt = image_format(data)
    message = _OBJECT_REPR.sub("", str(error)).strip()
    if isinstance(error, UnidentifiedImageError):
        if fmt is None:
            return f"not an image (unrecognised format; it begins {data[:12]!r})"
        return f"{fmt} whose header cannot be read (truncated or damaged)"
    if "truncated" in message.lower():
        return f"truncated {fmt or 'image'}"
    return f"damaged {fmt or 'image'} ({message or type(error).__name__})"


def append_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Append ``records`` as JSON lines in one ``write`` on a descriptor opened for appending, so
    lines from several processes appending to the same file never interleave."""
    if not records:
        return
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:  # a regular file takes it whole; the loop only guards against a short write
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)
