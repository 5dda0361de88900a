"""Generated images as a COCO instances set: ``<root>/<split>/*.png`` and
``<root>/annotations/instances_<split>.json`` (the layout of ``train2017`` / ``val2017``).

Every annotation carries the object's exact visible mask: as polygons (COCO's usual form; an
object with a hole falls back to RLE), uncompressed RLE (``counts`` a list) or compressed RLE
(``counts`` a string), all three of which pycocotools reads. Boxes are tight around the mask.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from mimscale.data_pipeline.synthetic import CLASSES, mask_to_rle, sample_at

from .polygons import mask_to_polygons

MASK_FORMATS = ("polygon", "rle", "compressed_rle")


def coco_categories() -> list[dict]:
    """COCO category records of the generator's classes; ids start at 1 as in COCO."""
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]


def _segmentation(mask: np.ndarray, fmt: str):
    if fmt == "polygon":
        polygons = mask_to_polygons(mask)
        if polygons is not None:
            return polygons
        fmt = "rle"
    if fmt == "rle":
        return mask_to_rle(mask)
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def write_coco(root: str | os.PathLike, split: str = "train2017", num_images: int = 64, size: int = 128,
               seed: int = 0, mask_format: str = "polygon", max_objects: int = 3, min_objects: int = 1) -> Path:
    """Write ``num_images`` generated images (``sample_at(seed, i)``) as a COCO split; returns the
    annotation file. Written into a temporary folder and moved into place, so a split on disk is
    always complete."""
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format {mask_format!r} is not valid; valid: {', '.join(MASK_FORMATS)}")
    root = Path(root)
    tmp = root / f".{split}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / split).mkdir(parents=True)
    images, annotations = [], []
    try:
        for i in range(num_images):
            sample = sample_at(seed, i, size=size, max_objects=max_objects, min_objects=min_objects)
            name = f"{i:012d}.png"
            Image.fromarray(sample.image).save(tmp / split / name)
            h, w = sample.image.shape[:2]
            images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
            for obj in sample.objects:
                x0, y0, x1, y1 = obj.box
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": obj.class_id + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(obj.area), "iscrowd": 0,
                    "segmentation": _segmentation(obj.mask, mask_format)})
        data = {"info": {"description": f"mimscale synthetic shapes (seed {seed}, {mask_format} masks)"},
                "images": images, "annotations": annotations, "categories": coco_categories()}
        (tmp / "annotations").mkdir()
        (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        final_images, final_ann = root / split, root / "annotations" / f"instances_{split}.json"
        shutil.rmtree(final_images, ignore_errors=True)
        (tmp / split).rename(final_images)
        (tmp / "annotations" / f"instances_{split}.json").replace(final_ann)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final_ann
