"""Data the classification tests write: brightness ramps in four directions.

Why ramps: an MAE has to learn where brightness is heading across the image to fill in hidden
patches, so a briefly pretrained encoder separates the four directions, while an untrained one
mostly sees colour; the 32-pixel shape images of the synthetic set need far longer training than
a test can afford before any encoder tells their classes apart.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["right", "down", "left", "up"]


def ramps(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``n`` RGB images ``[n, size, size, 3]`` uint8: a random colour whose brightness rises along one
    of four directions (the label, jittered by ±0.3 rad), with pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size - 0.5
    labels = rng.integers(0, len(CLASSES), n)
    images = np.empty((n, size, size, 3), np.uint8)
    for i, c in enumerate(labels):
        angle = 2 * np.pi * c / len(CLASSES) + rng.uniform(-0.3, 0.3)
        along = xx * np.cos(angle) + yy * np.sin(angle)
        colour, amplitude = rng.uniform(0.1, 0.9, 3), rng.uniform(0.3, 0.8)
        img = np.clip(colour + amplitude * along[..., None], 0, 1) + rng.normal(0, 0.04, (size, size, 3))
        images[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return images, labels


def write_imagefolder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    for i, (im, y) in enumerate(zip(images, labels)):
        folder = root / "train" / CLASSES[y]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / f"{i:05d}.png")
    return root


def write_cifar(root, name, train, test, classes):
    """CIFAR python-version pickles: ``train`` / ``test`` are (uint8 [N, 32, 32, 3], labels)."""
    if name == "cifar10":
        folder, meta, names, key = root / "cifar-10-batches-py", "batches.meta", b"label_names", b"labels"
        per = -(-len(train[1]) // 5)
        files = {f"data_batch_{i + 1}": (train[0][i * per:(i + 1) * per], train[1][i * per:(i + 1) * per])
                 for i in range(5)}
        files["test_batch"] = test
    else:
        folder, meta, names, key = root / "cifar-100-python", "meta", b"fine_label_names", b"fine_labels"
        files = {"train": train, "test": test}
    folder.mkdir(parents=True, exist_ok=True)
    for fname, (x, y) in files.items():
        batch = {b"data": np.asarray(x, np.uint8).transpose(0, 3, 1, 2).reshape(len(x), -1),
                 key: [int(v) for v in y], b"batch_label": fname.encode()}
        with open(folder / fname, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / meta, "wb") as f:
        pickle.dump({names: [c.encode() for c in classes]}, f)
    return folder
