"""Data sets whose splits and labels come from annotation files next to the images:
iNaturalist 2018/2019, Flowers-102, CUB-200-2011, Stanford Dogs, DTD."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .base import (
    DatasetLayoutError,
    LabeledImages,
    check_files,
    check_split,
    file_images,
    require,
    unpacked,
)

INAT_LAYOUT = """\
<root>/
  train{year}.json, val{year}.json     COCO-style: images [{{id, file_name}}], annotations
                                       [{{image_id, category_id}}], categories [{{id, name}}]
  train_val{year}/<super>/<category>/<image>.jpg   (file_name is relative to <root>)"""

FLOWERS_LAYOUT = """\
<root>/
  jpg/image_00001.jpg ... jpg/image_08189.jpg
  imagelabels.mat                      labels: 1 x 8189, classes 1..102
  setid.mat                            trnid, valid, tstid: 1-based image numbers"""

CUB_LAYOUT = """\
<root>/                                (CUB_200_2011/, or its parent)
  images.txt                           <image id> <path under images/>
  image_class_labels.txt               <image id> <class id 1..200>
  train_test_split.txt                 <image id> <1 = train, 0 = test>
  classes.txt                          <class id> <name>
  images/<class>/<image>.jpg"""

DOGS_LAYOUT = """\
<root>/
  Images/<wnid>-<breed>/<image>.jpg
  train_list.mat, test_list.mat        file_list (paths under Images/), labels (1..120)"""

DTD_LAYOUT = """\
<root>/                                (dtd/, or its parent)
  images/<class>/<class>_<id>.jpg
  labels/train<k>.txt, val<k>.txt, test<k>.txt    k = 1..10; lines: <class>/<image>.jpg"""


def _loadmat(path: Path, **options) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path.name} needs scipy: pip install 'mimscale[classify]'") from None
    return loadmat(str(path), **options)


def _mat_strings(arr) -> list[str]:
    """A MATLAB cell array of strings as a list (each cell loads as a 1-element array)."""
    return [str(np.ravel(x)[0]) if np.ndim(x) else str(x) for x in np.ravel(arr)]


def _read_table(dataset: str, root: Path, layout: str, name: str, columns: int) -> dict[str, list[str]]:
    """``id value...`` lines of a text file as ``{id: [values]}``."""
    out = {}
    for n, line in enumerate((root / name).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != columns:
            raise DatasetLayoutError(dataset, root, f"{name} line {n} has {len(parts)} fields, expected "
                                     f"{columns}: {line!r}", layout)
        out[parts[0]] = parts[1:]
    return out


def inaturalist(root: str | os.PathLike, split: str, year: int) -> LabeledImages:
    root, name = Path(root), f"inat{year}"
    layout = INAT_LAYOUT.format(year=year)
    check_split(name, split, ("train", "val"))
    require(name, root, layout, f"{split}{year}.json")
    data = json.loads((root / f"{split}{year}.json").read_text())
    missing = [k for k in ("images", "annotations") if k not in data]
    if missing:
        raise DatasetLayoutError(name, root, f"{split}{year}.json has no {missing}", layout)
    if data.get("categories"):
        cat_ids = sorted(c["id"] for c in data["categories"])
        names = {c["id"]: str(c.get("name", c["id"])) for c in data["categories"]}
    else:  # the label space is the training split's
        train = data if split == "train" else json.loads((root / f"train{year}.json").read_text())
        cat_ids = sorted({a["category_id"] for a in train["annotations"]})
        names = {c: str(c) for c in cat_ids}
    index = {c: i for i, c in enumerate(cat_ids)}
    label_of = {a["image_id"]: a["category_id"] for a in data["annotations"]}
    items = []
    for im in data["images"]:
        cat = label_of.get(im["id"])
        if cat is None:
            continue
        if cat not in index:
            raise DatasetLayoutError(name, root, f"image {im['file_name']} has category {cat}, which "
                                     "is not among the categories", layout)
        items.append((im["file_name"], index[cat]))
    check_files(name, root, layout, [k for k, _ in items])
    return file_images(name, split, root, [names[c] for c in cat_ids], items)


def flowers102(root: str | os.PathLike, split: str) -> LabeledImages:
    root, name = Path(root), "flowers102"
    check_split(name, split, ("train", "val", "test", "trainval"))
    require(name, root, FLOWERS_LAYOUT, "imagelabels.mat", "setid.mat", "jpg")
    labels = np.ravel(_loadmat(root / "imagelabels.mat")["labels"]).astype(int)
    sets = _loadmat(root / "setid.mat")
    parts = {"train": ["trnid"], "val": ["valid"], "test": ["tstid"], "trainval": ["trnid", "valid"]}[split]
    ids = np.concatenate([np.ravel(sets[p]).astype(int) for p in parts])
    if ids.min() < 1 or ids.max() > len(labels):
        raise DatasetLayoutError(name, root, f"setid.mat names images outside 1..{len(labels)}", FLOWERS_LAYOUT)
    classes = [str(c) for c in range(1, 103)]
    items = [(f"jpg/image_{i:05d}.jpg", int(labels[i - 1]) - 1) for i in sorted(ids)]
    check_files(name, root, FLOWERS_LAYOUT, [k for k, _ in items])
    return file_images(name, split, root, classes, items)


def cub200(root: str | os.PathLike, split: str) -> LabeledImages:
    root, name = unpacked(root, "CUB_200_2011"), "cub200"
    check_split(name, split, ("train", "test"))
    files = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
    require(name, root, CUB_LAYOUT, *files, "images")
    paths = _read_table(name, root, CUB_LAYOUT, "images.txt", 2)
    labels = _read_table(name, root, CUB_LAYOUT, "image_class_labels.txt", 2)
    is_train = _read_table(name, root, CUB_LAYOUT, "train_test_split.txt", 2)
    class_rows = _read_table(name, root, CUB_LAYOUT, "classes.txt", 2)
    class_ids = sorted(class_rows, key=int)
    classes = [class_rows[c][0] for c in class_ids]
    index = {c: i for i, c in enumerate(class_ids)}
    want = "1" if split == "train" else "0"
    items = []
    for image_id, (rel,) in sorted(paths.items(), key=lambda kv: int(kv[0])):
        if image_id not in labels or image_id not in is_train:
            raise DatasetLayoutError(name, root, f"image id {image_id} of images.txt has no label or "
                                     "no split", CUB_LAYOUT)
        if labels[image_id][0] not in index:
            raise DatasetLayoutError(name, root, f"image id {image_id} has class {labels[image_id][0]}, "
                                     "which classes.txt does not list", CUB_LAYOUT)
        if is_train[image_id][0] == want:
            items.append((f"images/{rel}", index[labels[image_id][0]]))
    check_files(name, root, CUB_LAYOUT, [k for k, _ in items])
    return file_images(name, split, root, classes, items)


def stanford_dogs(root: str | os.PathLike, split: str) -> LabeledImages:
    root, name = Path(root), "stanford_dogs"
    check_split(name, split, ("train", "test"))
    require(name, root, DOGS_LAYOUT, f"{split}_list.mat", "Images")
    mat = _loadmat(root / f"{split}_list.mat")
    files = _mat_strings(mat["file_list"])
    labels = np.ravel(mat["labels"]).astype(int) - 1
    if len(files) != len(labels):
        raise DatasetLayoutError(name, root, f"{split}_list.mat lists {len(files)} files and "
                                 f"{len(labels)} labels", DOGS_LAYOUT)
    # class names: the breed folders, in label order (the official labels follow the sorted folders)
    folders = sorted(p.name for p in (root / "Images").iterdir() if p.is_dir())
    for f, y in zip(files, labels):
        if not 0 <= y < len(folders) or f.split("/")[0] != folders[y]:
            raise DatasetLayoutError(name, root, f"{split}_list.mat puts {f} in class {y + 1}, but the "
                                     f"{y + 1}-th breed folder of Images/ is "
                                     f"{folders[y] if 0 <= y < len(folders) else 'missing'}", DOGS_LAYOUT)
    items = [(f"Images/{f}", int(y)) for f, y in zip(files, labels)]
    check_files(name, root, DOGS_LAYOUT, [k for k, _ in items])
    return file_images(name, split, root, folders, items)


def dtd(root: str | os.PathLike, split: str, fold: int = 1) -> LabeledImages:
    root, name = unpacked(root, "dtd"), "dtd"
    check_split(name, split, ("train", "val", "test", "trainval"))
    if not 1 <= fold <= 10:
        raise ValueError(f"dtd: fold {fold} is not one of the official splits 1..10")
    parts = ["train", "val"] if split == "trainval" else [split]
    require(name, root, DTD_LAYOUT, "images", *(f"labels/{p}{fold}.txt" for p in parts))
    classes = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for p in parts:
        for line in (root / "labels" / f"{p}{fold}.txt").read_text().split():
            cls = line.split("/")[0]
            if cls not in index:
                raise DatasetLayoutError(name, root, f"labels/{p}{fold}.txt names {line}, whose class "
                                         "has no folder in images/", DTD_LAYOUT)
            items.append((f"images/{line}", index[cls]))
    check_files(name, root, DTD_LAYOUT, [k for k, _ in items])
    return file_images(name, split, root, classes, items)
