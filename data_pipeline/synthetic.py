"""Procedural images of simple shapes with exact per-object masks and boxes.

Why: the project needs data that exists without any download -- for MAE pretraining demos now
and, later, for COCO/ADE20K-style detection/segmentation exports and mask-quality checks. Every
image is a pure function of ``(seed, index)``, so any subset can be regenerated bit-exactly.

Object masks are the *visible* pixels after occlusion (later objects are drawn on top), so masks
never overlap and ``instance_map()``/``semantic_map()`` are lossless views of them. Boxes are
``(x0, y0, x1, y1)`` in pixel-edge coordinates (pixel ``j`` spans ``[j, j + 1)``), i.e. tight
around the mask with exclusive ``x1``/``y1`` -- the COCO convention (``w = x1 - x0``).
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Alphabetical on purpose: an ImageFolder over all class folders then assigns label == class_id.
CLASSES: tuple[str, ...] = ("cross", "disc", "ring", "square", "star", "triangle")
# Area of each shape in units of r**2 (r = the shape's outer radius); used to hit a target coverage.
_AREA_K = {"cross": 1.93, "disc": np.pi, "ring": 2.19, "square": 2.56, "star": 1.47,
           "triangle": 1.30}
# Bump when the drawing code changes so cached folders (see ``ensure_imagefolder``) are rebuilt.
GENERATOR_VERSION = 1
MARKER = ".complete"
OBJECTS_FILE = "objects.jsonl"


@dataclass(eq=False)  # numpy fields: compare arrays explicitly, not with ==
class SyntheticObject:
    class_id: int
    class_name: str
    mask: np.ndarray  # bool [H, W], visible pixels only
    box: tuple[float, float, float, float]  # xyxy, tight, exclusive x1/y1

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass(eq=False)
class SyntheticSample:
    image: np.ndarray  # uint8 [H, W, 3]
    objects: list[SyntheticObject]

    @property
    def label(self) -> int:
        """Image-level class: that of the object with the most visible pixels."""
        return max(self.objects, key=lambda o: o.area).class_id

    def instance_map(self) -> np.ndarray:
        """int32 [H, W]: 0 = background, i + 1 = ``objects[i]``."""
        out = np.zeros(self.image.shape[:2], np.int32)
        for i, o in enumerate(self.objects):
            out[o.mask] = i + 1
        return out

    def semantic_map(self) -> np.ndarray:
        """int32 [H, W]: 0 = background, ``class_id + 1`` elsewhere."""
        out = np.zeros(self.image.shape[:2], np.int32)
        for o in self.objects:
            out[o.mask] = o.class_id + 1
        return out


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = mask.any(1), mask.any(0)
    y0, y1 = int(rows.argmax()), len(rows) - int(rows[::-1].argmax())
    x0, x1 = int(cols.argmax()), len(cols) - int(cols[::-1].argmax())
    return (float(x0), float(y0), float(x1), float(y1))


def _shape_mask(name: str, xx, yy, cx, cy, r, theta) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * dx + s * dy, -s * dx + c * dy
    d = np.hypot(u, v)
    if name == "disc":
        return d <= r
    if name == "ring":
        return (d <= r) & (d >= 0.55 * r)
    if name == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8 * r
    if name == "cross":
        w = 0.28 * r
        return ((abs(u) <= r) & (abs(v) <= w)) | ((abs(v) <= r) & (abs(u) <= w))
    if name == "triangle":  # equilateral, circumradius r -> inradius r / 2
        inside = np.ones_like(d, bool)
        for k in range(3):
            a = np.pi / 3 + k * 2 * np.pi / 3
            inside &= u * np.cos(a) + v * np.sin(a) <= r / 2
        return inside
    if name == "star":  # 5 points, inner radius 0.5 r: radius of the edge line at each angle
        t = np.mod(np.arctan2(v, u), 2 * np.pi / 5)
        a = np.minimum(t, 2 * np.pi / 5 - t)
        ax, ay = r, 0.0
        bx, by = 0.5 * r * np.cos(np.pi / 5), 0.5 * r * np.sin(np.pi / 5)
        nx, ny = by - ay, ax - bx
        rho = (nx * ax + ny * ay) / (nx * np.cos(a) + ny * np.sin(a))
        return d <= rho
    raise ValueError(f"unknown shape {name!r}")


def _hsv(h, s, v) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _background(rng: np.random.Generator, xx, yy, size: int) -> np.ndarray:
    """Muted (low-saturation) gradients + waves + optional stripes: textured but unlike objects."""
    h = rng.uniform()
    ca = _hsv(h, rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.85))
    cb = _hsv(h + rng.uniform(-0.3, 0.3), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.85))
    ang = rng.uniform(0, 2 * np.pi)
    t = ((xx - size / 2) * np.cos(ang) + (yy - size / 2) * np.sin(ang)) / size + 0.5
    img = ca * (1 - t[..., None]) + cb * t[..., None]
    f = rng.uniform(0.5, 2.0, 2) * 2 * np.pi / size
    img = img + rng.uniform(0.02, 0.07, 3) * np.sin(f[0] * xx + f[1] * yy + rng.uniform(0, 6.3))[
        ..., None]
    if rng.uniform() < 0.5:
        a, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
        proj = xx * np.cos(a) + yy * np.sin(a)
        img = img + rng.uniform(0.03, 0.08) * np.sign(np.sin(2 * np.pi * proj / period))[..., None]
    return img


def _texture(rng: np.random.Generator, xx, yy, cx, cy, r, theta) -> np.ndarray:
    """Pattern weight in [0, 1] over the image: flat, stripes, checker or radial gradient."""
    kind = rng.integers(4)
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * (xx - cx) + s * (yy - cy), -s * (xx - cx) + c * (yy - cy)
    period = max(3.0, rng.uniform(0.25, 0.6) * r)
    if kind == 0:
        return np.zeros_like(xx)
    if kind == 1:
        return (np.sin(2 * np.pi * u / period) > 0).astype(float)
    if kind == 2:
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(float)
    return np.clip(np.hypot(u, v) / r, 0, 1)


def _edge(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1)
    interior = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~interior


def generate_sample(rng: np.random.Generator, size: int = 64, max_objects: int = 3,
                    min_objects: int = 1) -> SyntheticSample:
    """One image with 1..max_objects shapes, each ~5-40 % of the image (fewer if it can't fit).

    Placement is rejection-sampled so each object keeps >= 60 % of its pixels visible; objects
    are saturated, textured and outlined so they stand out from the muted background.
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    yy, xx = np.mgrid[0:size, 0:size].astype(float) + 0.5
    canvas = _background(rng, xx, yy, size)
    n_obj = int(rng.integers(min_objects, max_objects + 1))
    npix = size * size
    inst = np.zeros((size, size), np.int32)
    full_areas: list[int] = []
    classes: list[int] = []
    for _ in range(n_obj):
        for _attempt in range(30):
            cid = int(rng.integers(len(CLASSES)))
            name = CLASSES[cid]
            frac = rng.uniform(0.06, min(0.35, 0.8 / n_obj))
            r = min(np.sqrt(frac * npix / _AREA_K[name]), 0.45 * size)
            lo = min(0.85 * r, size / 2)
            cx, cy = rng.uniform(lo, size - lo, 2)
            theta = rng.uniform(0, 2 * np.pi)
            mask = _shape_mask(name, xx, yy, cx, cy, r, theta)
            if mask.sum() < 0.04 * npix:
                continue
            new_inst = np.where(mask, len(classes) + 1, inst)
            vis = np.bincount(new_inst.ravel(), minlength=len(classes) + 2)[1:-1]
            if all(vis[i] >= 0.6 * full_areas[i] for i in range(len(classes))):
                break
        else:
            continue  # could not place without hiding others; keep fewer objects
        # Colour: saturated, and far from what is already under the mask.
        under = canvas[mask].mean(0)
        for _c in range(10):
            col = _hsv(rng.uniform(), rng.uniform(0.65, 1.0), rng.uniform(0.55, 1.0))
            if np.linalg.norm(col - under) > 0.35:
                break
        pat = _texture(rng, xx, yy, cx, cy, r, theta)[..., None]
        tex = col * (1 - pat) + col * rng.uniform(0.45, 0.75) * pat
        canvas = np.where(mask[..., None], tex, canvas)
        canvas[_edge(mask)] = col * 0.3
        inst, full_areas, classes = new_inst, full_areas + [int(mask.sum())], classes + [cid]
    canvas = canvas + rng.normal(0, rng.uniform(0.0, 0.03), canvas.shape)
    image = np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)
    objects = []
    for i, cid in enumerate(classes):
        m = inst == i + 1
        objects.append(SyntheticObject(cid, CLASSES[cid], m, mask_to_box(m)))
    return SyntheticSample(image, objects)


def sample_at(seed: int, index: int, size: int = 64, max_objects: int = 3,
              min_objects: int = 1) -> SyntheticSample:
    """Sample ``index`` of the dataset ``seed``: depends on nothing else."""
    return generate_sample(np.random.default_rng([seed, index]), size, max_objects, min_objects)


def generate_dataset(n: int, size: int = 64, seed: int = 0, max_objects: int = 3,
                     min_objects: int = 1) -> Iterator[SyntheticSample]:
    for i in range(n):
        yield sample_at(seed, i, size, max_objects, min_objects)


# ---- COCO-style uncompressed RLE (column-major, counts start with a background run) ----------

def mask_to_rle(mask: np.ndarray) -> dict:
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def rle_to_mask(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], np.int64)
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return flat.reshape((h, w), order="F")


def sample_record(sample: SyntheticSample, index: int) -> dict:
    """JSON-ready annotations of a sample: label, size and objects with exact RLE masks."""
    objs = [{"class_id": o.class_id, "class_name": o.class_name, "box": list(o.box),
             "area": o.area, "segmentation": mask_to_rle(o.mask)} for o in sample.objects]
    return {"index": index, "label": sample.label, "size": list(sample.image.shape[:2]),
            "objects": objs}


# ---- image-folder export ------------------------------------------------------------------

def write_imagefolder(root: str | os.PathLike, num_images: int, size: int = 64, seed: int = 0,
                      split: str = "train", max_objects: int = 3, min_objects: int = 1,
                      progress: bool = False) -> Path:
    """Write ``root/split/<class>/<index:06d>.png`` + ``objects.jsonl`` (+ ``.complete`` last).

    Everything is built in a temporary sibling folder and renamed into place, so ``root/split``
    is either the previous complete version or the new one; an interrupted run leaves no
    ``.complete`` marker. All class folders are created (even empty ones) so ImageFolder labels
    equal ``class_id``. Call from one process only (e.g. rank 0) when running distributed.
    """
    root = Path(root)
    final = root / split
    params = _params(num_images, size, seed, split, max_objects, min_objects)
    tmp = root / f".{split}.tmp-{os.getpid()}"
    if final.exists() and not ((final / MARKER).exists() or (final / OBJECTS_FILE).exists()) \
            and any(final.iterdir()):
        raise FileExistsError(f"{final} exists and was not written by write_imagefolder")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name in CLASSES:
            (tmp / name).mkdir(parents=True)
        with open(tmp / OBJECTS_FILE, "w") as f:
            for i, s in enumerate(generate_dataset(num_images, size, seed, max_objects,
                                                   min_objects)):
                rel = f"{CLASSES[s.label]}/{i:06d}.png"
                Image.fromarray(s.image).save(tmp / rel)
                f.write(json.dumps({"path": rel, **sample_record(s, i)}) + "\n")
                if progress and (i + 1) % max(1, num_images // 10) == 0:
                    print(f"synthetic {split}: {i + 1}/{num_images}", file=sys.stderr)
        (tmp / MARKER).write_text(json.dumps(params))
        if final.exists():
            old = root / f".{split}.old-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _params(num_images, size, seed, split, max_objects, min_objects) -> dict:
    return {"version": GENERATOR_VERSION, "num_images": int(num_images), "size": int(size),
            "seed": int(seed), "split": split, "max_objects": int(max_objects),
            "min_objects": int(min_objects)}


def ensure_imagefolder(root: str | os.PathLike, num_images: int, size: int = 64, seed: int = 0,
                       split: str = "train", max_objects: int = 3, min_objects: int = 1,
                       progress: bool = False) -> Path:
    """Generate once, then reuse: rewrite only if the marker is missing or its params differ."""
    final = Path(root) / split
    try:
        done = json.loads((final / MARKER).read_text())
    except (OSError, ValueError):
        done = None
    if done == _params(num_images, size, seed, split, max_objects, min_objects):
        return final
    return write_imagefolder(root, num_images, size, seed, split, max_objects, min_objects,
                             progress)


def load_objects(root: str | os.PathLike, split: str = "train") -> dict[str, list[SyntheticObject]]:
    """Read ``objects.jsonl`` back: ``{relative image path: objects}`` with exact masks."""
    out = {}
    with open(Path(root) / split / OBJECTS_FILE) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["path"]] = [
                SyntheticObject(o["class_id"], o["class_name"], rle_to_mask(o["segmentation"]),
                                tuple(o["box"])) for o in rec["objects"]]
    return out


# ---- shard export -------------------------------------------------------------------------

def write_shards(out: str | os.PathLike, num_images: int, size: int = 64, seed: int = 0,
                 fmt: str = "wds", quality: int | None = None, max_objects: int = 3,
                 min_objects: int = 1, **writer_options) -> Path:
    """Generate straight into webdataset shards (``fmt='wds'``, a folder) or a ``.beton`` file.

    Each sample stores the image (PNG, or JPEG with ``quality``), its label and its objects with
    exact masks (``.json``, as in ``objects.jsonl``); ``writer_options`` go to the writer
    (``mimscale.data_pipeline.shards``).
    """
    from .shards import SyntheticInput, write_beton, write_wds

    items = SyntheticInput(num_images, size, seed, max_objects, min_objects)
    if fmt == "wds":
        return write_wds(items, out, quality=quality, **writer_options)
    if fmt == "beton":
        return write_beton(items, out, quality=quality, **writer_options)
    raise ValueError(f"fmt {fmt!r} is not valid; valid: wds, beton")
