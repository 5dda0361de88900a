"""Data sets stored as class folders: ImageNet (and any ImageFolder), TinyImageNet, and the
generated synthetic set."""

from __future__ import annotations

import os
from pathlib import Path

from mimscale.data_pipeline.sources.imagefolder import ImageFolderSource

from .base import DatasetLayoutError, LabeledImages, check_split, file_images, require, unpacked

IMAGENET_LAYOUT = """\
<root>/
  train/<class>/<image>.JPEG     e.g. train/n01440764/n01440764_10026.JPEG
  val/<class>/<image>.JPEG       the validation images sorted into class folders (as MAE expects),
or, for imagenet, val/ as distributed (ILSVRC2012_val_00000001.JPEG, ... in one folder) with its labels:
  ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt and meta.mat (in <root>), or
  LOC_val_solution.csv (Kaggle's archive: in <root> or up to three folders above it)"""

TINYIMAGENET_LAYOUT = """\
<root>/                          (tiny-imagenet-200/, or its parent)
  wnids.txt                      the 200 class ids
  train/<wnid>/images/<wnid>_<i>.JPEG
  val/images/val_<i>.JPEG
  val/val_annotations.txt        <file> <wnid> <x0> <y0> <x1> <y1> per line, tab-separated"""


def _scan(dataset: str, root: Path, split: str) -> ImageFolderSource:
    try:
        return ImageFolderSource(root / split)
    except ValueError as e:
        raise DatasetLayoutError(dataset, root, f"no images in the class folders of '{split}/' ({e})",
                                 IMAGENET_LAYOUT) from None


def imagenet(root: str | os.PathLike, split: str, name: str = "imagenet") -> LabeledImages:
    """ImageFolder splits; labels are the sorted class folders of ``train/`` in every split. An
    ImageNet ``val/`` as distributed (no class folders) is labelled from the devkit or Kaggle's
    solution file, so it need not be sorted into folders first."""
    root = Path(root)
    check_split(name, split, ("train", "val"))
    require(name, root, IMAGENET_LAYOUT, "train", split)
    if name == "imagenet" and split == "val" and _flat(root / split):
        return _flat_val(name, root, _scan(name, root, "train").classes)
    classes = _scan(name, root, "train").classes if split != "train" else None
    source = _scan(name, root, split)
    classes = classes or source.classes
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(source.classes) - set(index))
    if unknown:
        raise DatasetLayoutError(name, root, f"'{split}/' has class folders that 'train/' lacks: "
                                 f"{unknown[:5]}", IMAGENET_LAYOUT)
    items = [(os.path.relpath(path, root), index[source.classes[y]]) for path, y in source.samples]
    return file_images(name, split, root, classes, items)


_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _flat(folder: Path) -> bool:
    """Images directly in ``folder`` and no sub-folders: a validation set as distributed."""
    entries = list(folder.iterdir())
    return not any(e.is_dir() for e in entries) and any(e.suffix.lower() in _IMAGE_SUFFIXES for e in entries)


def _flat_val(name: str, root: Path, classes: list[str]) -> LabeledImages:
    files = sorted(p.name for p in (root / "val").iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    wnid_of = _flat_val_labels(name, root, files)
    index = {c: i for i, c in enumerate(classes)}
    missing = [f for f in files if Path(f).stem not in wnid_of]
    if missing:
        raise DatasetLayoutError(name, root, f"{len(missing)} image(s) of 'val/' have no label, e.g. "
                                 f"{missing[:3]}", IMAGENET_LAYOUT)
    unknown = sorted({wnid_of[Path(f).stem] for f in files} - set(index))
    if unknown:
        raise DatasetLayoutError(name, root, f"the validation labels name classes that 'train/' lacks: "
                                 f"{unknown[:5]}", IMAGENET_LAYOUT)
    return file_images(name, "val", root, classes, [(f"val/{f}", index[wnid_of[Path(f).stem]]) for f in files])


def _flat_val_labels(name: str, root: Path, files: list[str]) -> dict[str, str]:
    """``{image stem: wnid}`` for a flat ``val/``, from the devkit or Kaggle's solution file."""
    devkit = root / "ILSVRC2012_devkit_t12" / "data"
    truth, meta = devkit / "ILSVRC2012_validation_ground_truth.txt", devkit / "meta.mat"
    if truth.is_file() and meta.is_file():
        from .annotated import _loadmat

        synsets = _loadmat(meta, squeeze_me=True)["synsets"]
        wnid_of_id = {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"])}
        ids = [int(line) for line in truth.read_text().split()]
        # the ground truth lists the 50,000 images in the order of their numbers
        return {f"ILSVRC2012_val_{n:08d}": wnid_of_id[i] for n, i in enumerate(ids, 1)}
    for folder in [root, *list(root.resolve().parents)[:3]]:
        solution = folder / "LOC_val_solution.csv"
        if solution.is_file():
            rows = solution.read_text().splitlines()[1:]  # ImageId,PredictionString (wnid box wnid box ...)
            return {image: boxes.split()[0] for image, _, boxes in (r.partition(",") for r in rows) if boxes}
    raise DatasetLayoutError(name, root, "'val/' holds the images in one folder (as distributed) but no "
                             "labels for them were found", IMAGENET_LAYOUT)


def tinyimagenet(root: str | os.PathLike, split: str) -> LabeledImages:
    root = unpacked(root, "tiny-imagenet-200")
    name = "tinyimagenet"
    check_split(name, split, ("train", "val"))
    require(name, root, TINYIMAGENET_LAYOUT, "wnids.txt", split)
    classes = sorted(line.strip() for line in (root / "wnids.txt").read_text().splitlines() if line.strip())
    index = {c: i for i, c in enumerate(classes)}
    items: list[tuple[str, int]] = []
    if split == "train":
        for wnid in classes:
            folder = root / "train" / wnid / "images"
            if not folder.is_dir():
                raise DatasetLayoutError(name, root, f"'train/{wnid}/images/' is missing", TINYIMAGENET_LAYOUT)
            items += [(f"train/{wnid}/images/{p.name}", index[wnid]) for p in sorted(folder.iterdir())
                      if p.suffix.lower() in (".jpeg", ".jpg", ".png")]
    else:
        require(name, root, TINYIMAGENET_LAYOUT, "val/val_annotations.txt", "val/images")
        for n, line in enumerate((root / "val" / "val_annotations.txt").read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise DatasetLayoutError(name, root, f"val/val_annotations.txt line {n} does not name a "
                                         f"file and a wnid of wnids.txt: {line!r}", TINYIMAGENET_LAYOUT)
            items.append((f"val/images/{parts[0]}", index[parts[1]]))
    if not items:
        raise DatasetLayoutError(name, root, f"no images in the {split} split", TINYIMAGENET_LAYOUT)
    return file_images(name, split, root, classes, items)


def synthetic(root: str | os.PathLike, split: str) -> LabeledImages:
    """The generated shapes (``write_imagefolder``) in ImageNet layout; see ``ensure_synthetic``."""
    return imagenet(root, split, name="synthetic")


def ensure_synthetic(root: str | os.PathLike, train_images: int, val_images: int, size: int,
                     max_objects: int = 1) -> Path:
    """Generate (once) a train and a val split from different seeds. One object per image by
    default, so the label (the largest object's shape) is unambiguous."""
    from mimscale.data_pipeline.synthetic import ensure_imagefolder

    ensure_imagefolder(root, train_images, size, seed=1, split="train", max_objects=max_objects)
    ensure_imagefolder(root, val_images, size, seed=2, split="val", max_objects=max_objects)
    return Path(root)
