"""Names of the classes a segmentation model predicts, so that ``eval.json`` and the per-class
table say "wall 0.71" rather than "0 0.71".

Sources, first found wins: the data folder's ``classes.json`` (what the project's ADE20K writer
makes: names of labels 1..K), the ADE20K release's own ``objectInfo150.txt`` in the data folder,
then the 150 ADE20K names shipped with mimscale (``ade20k_classes.txt``), used only when the
configured class count is ADE20K's. ``objectInfo150.txt`` lists synonyms ("windowpane, window"):
the first one names the class, as in the shipped list.
"""

from __future__ import annotations

import json
from pathlib import Path

from mimscale.errors import DataError

OBJECT_INFO = "objectInfo150.txt"
SHIPPED = Path(__file__).with_name("ade20k_classes.txt")


def shipped_ade20k_names() -> list[str]:
    """ADE20K's 150 class names (labels 1..150)."""
    lines = SHIPPED.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def read_object_info(path: Path) -> list[str]:
    """Class names of labels 1..K from ADE20K's ``objectInfo150.txt`` (tab-separated: Idx, Ratio,
    Train, Val, Name; a header line; names are comma-separated synonyms)."""
    names: dict[int, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fields = [f.strip() for f in line.split("\t")]
        if not line.strip() or fields[0] == "Idx":
            continue
        if len(fields) < 2 or not fields[0].isdigit() or not fields[-1]:
            raise DataError(f"{path}: line {n} is not 'Idx<TAB>...<TAB>Name': {line.strip()!r}")
        names[int(fields[0])] = fields[-1].split(",")[0].strip()
    if sorted(names) != list(range(1, len(names) + 1)):
        raise DataError(f"{path}: the class indices are not 1..{len(names)}")
    return [names[i] for i in range(1, len(names) + 1)]


def label_names(root: str | Path, num_classes: int, reduce_zero_label: bool = True) -> list[str] | None:
    """Names of the model's ``num_classes`` outputs in order, or None when no source has that many:
    with ``reduce_zero_label`` output k is label k + 1; without, output 0 is label 0 ("other")."""
    root = Path(root)
    if (root / "classes.json").is_file():
        labels = json.loads((root / "classes.json").read_text())
    elif (root / OBJECT_INFO).is_file():
        labels = read_object_info(root / OBJECT_INFO)
    else:
        labels = shipped_ade20k_names()
    outputs = list(labels) if reduce_zero_label else ["other", *labels]
    return outputs if len(outputs) == num_classes else None
