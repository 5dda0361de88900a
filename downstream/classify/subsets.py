"""Semi-supervised training subsets (1 % / 10 % of the labels): from a file, or drawn per class.

A drawn subset takes ``max(1, round(fraction · n_c))`` samples of every class ``c``, without
replacement, from a generator seeded with ``seed``; the draw is written out as a subset file, so a
later run (or another code base) trains on exactly the same images. A subset file lists one sample
per line: its key (path relative to the data set root) or the key's base name, which is how the
SimCLR ImageNet 1 % / 10 % lists name images (``n01440764_10026.JPEG``).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import torch

from .datasets import LabeledImages


def draw_per_class(labels: list[int], fraction: float, seed: int) -> list[int]:
    """Sorted indices of a class-balanced draw of ``fraction`` of ``labels``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"subset fraction {fraction} must be in (0, 1]")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for y in sorted(by_class):
        members = by_class[y]
        take = max(1, round(fraction * len(members)))
        order = torch.randperm(len(members), generator=g)[:take]
        chosen += [members[i] for i in order.tolist()]
    return sorted(chosen)


def read_subset_file(path: str | os.PathLike, keys: list[str]) -> list[int]:
    """Indices of the samples a subset file names; a name that matches no sample is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subset file {path} does not exist")
    by_key = {k: i for i, k in enumerate(keys)}
    by_base: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        by_base[os.path.basename(k)].append(i)
    chosen, unknown = set(), []
    for line in path.read_text().splitlines():
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name in by_key:
            chosen.add(by_key[name])
        elif len(by_base.get(name, ())) == 1:
            chosen.add(by_base[name][0])
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"subset file {path}: {len(unknown)} name(s) match no single sample of the "
                         f"training split, e.g. {unknown[:3]}; lines must be sample paths relative to "
                         f"the data set root (e.g. {keys[0]!r}) or unique base names")
    if not chosen:
        raise ValueError(f"subset file {path} names no sample")
    return sorted(chosen)


def write_subset_file(path: str | os.PathLike, keys: list[str], indices: list[int], note: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(f"# {note}\n" + "".join(f"{keys[i]}\n" for i in indices))
    tmp.replace(path)
    return path


def training_subset(dataset: LabeledImages, fraction: float | None, file: str | None, seed: int,
                    save_to: str | os.PathLike | None) -> LabeledImages:
    """``dataset`` restricted to the subset a file names or a seeded per-class draw. Either way the
    samples used are saved to ``save_to`` (when given), as paths relative to the data set root, so
    the run folder holds its own subset even when the file it came from changes or goes."""
    if file:
        indices = read_subset_file(file, dataset.keys)
        note = f"{dataset.name} {dataset.split}: from {file}"
    elif fraction is None:
        return dataset
    else:
        indices = draw_per_class(dataset.labels, fraction, seed)
        note = f"{dataset.name} {dataset.split}: {fraction:g} per class, seed {seed}"
    if save_to is not None:
        write_subset_file(save_to, dataset.keys, indices, f"{note}, {len(indices)} of {len(dataset)} samples")
    return dataset.subset(indices)
