"""Generated images as an ADE20K-layout semantic segmentation set (``ADEChallengeData2016``):
``<root>/images/<split>/<name>.jpg`` (as ADE20K; ``.png`` on request, lossless) and
``<root>/annotations/<split>/<name>.png``.

Label PNGs follow ADE20K: 8-bit, 0 = "other" (ignored under ``reduce_zero_label``), classes from 1.
Every generated pixel is labelled: 1 is the background (a "stuff" class like ADE's wall or sky) and
shape ``c`` is ``c + 2``, so with ``reduce_zero_label`` a model sees ``1 + len(CLASSES)`` classes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from mimscale.data_pipeline.synthetic import CLASSES, sample_at

ADE_CLASSES: tuple[str, ...] = ("background",) + CLASSES


def ade_label(sample) -> np.ndarray:
    """uint8 ``[H, W]`` ADE label of a sample: 1 = background, ``class_id + 2`` = shape."""
    return (sample.semantic_map() + 1).astype(np.uint8)


def write_ade20k(root: str | os.PathLike, split: str = "training", num_images: int = 64, size: int = 128,
                 seed: int = 0, max_objects: int = 3, min_objects: int = 1, image_ext: str = ".jpg") -> Path:
    """Write ``num_images`` generated images as the ``split`` of an ADE20K-layout folder, plus
    ``classes.json`` (the names of labels 1..K); returns ``root``. Each split folder is written
    aside and moved into place."""
    if image_ext not in (".jpg", ".png"):
        raise ValueError(f"image_ext {image_ext!r} is not valid; valid: .jpg, .png")
    root = Path(root)
    tmp = root / f".{split}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "annotations").mkdir()
    try:
        for i in range(num_images):
            sample = sample_at(seed, i, size=size, max_objects=max_objects, min_objects=min_objects)
            name = f"ADE_{split}_{i:08d}"
            Image.fromarray(sample.image).save(tmp / "images" / f"{name}{image_ext}", quality=95)
            Image.fromarray(ade_label(sample)).save(tmp / "annotations" / f"{name}.png")
        for kind in ("images", "annotations"):
            final = root / kind / split
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(final, ignore_errors=True)
            (tmp / kind).rename(final)
        (root / "classes.json").write_text(json.dumps(list(ADE_CLASSES)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
