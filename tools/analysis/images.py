"""Images to analyse: the generated set (objects known exactly) or a folder, optionally with a
parallel folder of foreground-mask PNGs. Masks get the images' exact geometry (resize + centre crop)
so patch ``i`` of a mask lies under patch ``i`` of its image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimscale.data_pipeline.pixels import to_rgb
from mimscale.data_pipeline.transforms import eval_transform

from ..common import patch_foreground, synthetic_with_foreground
from .output import AnalysisError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CROP_PCT = 0.875  # eval_transform's: resize the short side to size / 0.875, centre-crop size


def image_paths(root: str | Path, limit: int) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise AnalysisError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return paths[:limit]


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """``[n, 3, size, size]`` ImageNet-normalised, as the evaluation transform makes them."""
    tf = eval_transform(size, CROP_PCT)
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(tf(to_rgb(im)))
    return torch.stack(out)


def mask_for(image: Path, image_root: Path, mask_root: Path) -> Path:
    """``images/a/b.jpg`` -> ``masks/a/b.png``, else ``masks/b.png``."""
    rel = image.relative_to(image_root).with_suffix(".png")
    for candidate in (mask_root / rel, mask_root / rel.name):
        if candidate.is_file():
            return candidate
    raise AnalysisError(f"no foreground mask for {image}: looked for {mask_root / rel} and "
                        f"{mask_root / rel.name} (a PNG whose non-zero pixels are the object)")


def load_foreground(paths: list[Path], image_root: str | Path, mask_root: str | Path, size: int,
                    patch: int) -> torch.Tensor:
    """``[n, N]`` bool: patches at least half covered by the mask's non-zero pixels."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    if not Path(mask_root).is_dir():
        raise FileNotFoundError(f"mask folder {mask_root} does not exist")
    geometry = T.Compose([T.Resize(round(size / CROP_PCT), interpolation=InterpolationMode.NEAREST),
                          T.CenterCrop(size)])
    out = []
    for p in paths:
        with Image.open(mask_for(p, Path(image_root), Path(mask_root))) as m:
            out.append(patch_foreground(np.asarray(geometry(m.convert("L"))), patch))
    return torch.stack(out)


def synthetic(num: int, size: int, patch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated images ``[num, 3, size, size]`` and their patch foreground ``[num, N]``."""
    return synthetic_with_foreground(num, size, patch, seed)


class ImageSource:
    """The same images at whatever size each model needs (the folder or the generated set)."""

    def __init__(self, folder: str | None, num: int, seed: int = 0):
        self.folder, self.num, self.seed = folder, num, seed
        self.paths = image_paths(folder, num) if folder else None
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else self.num

    def at(self, size: int) -> torch.Tensor:
        if size not in self._cache:
            if self.paths is not None:
                self._cache[size] = load_images(self.paths, size)
            else:  # patch size only shapes the foreground, which is not used here
                self._cache[size] = synthetic(self.num, size, size, self.seed)[0]
        return self._cache[size]

    def describe(self) -> str:
        return f"{len(self)} images from {self.folder}" if self.folder else f"{self.num} synthetic images"
