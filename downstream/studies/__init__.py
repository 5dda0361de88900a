"""Study files: every masking method pretrained side by side under one budget, with seeds, then
evaluated and tabulated (``mimscale study FILE``).

Format (``tiny.yaml`` and ``vitb.yaml`` are shipped; a shipped study can be named without ``.yaml``)::

    out: runs/studies/tiny            # the study folder (``--out`` overrides it)
    recipes: [mae, block, gpa]        # pretraining recipes, one row each
    seeds: [0, 1, 2]                  # every recipe runs once per seed (engine.seed)
    baseline: mae                     # paired differences are taken against this row
    teacher: study                    # frozen teachers (GPA): the study's own baseline run of the
                                      # same seed and budget; or a checkpoint path
    model: {name: mae_vit_tiny_patch16, img_size: 64, patch_size: 8}
    data:                             # synthetic (generated into <out>/data, 6 shape classes) or
      dataset: synthetic              # imagefolder: root with train/<class>/ and val/<class>/
      root: null
      train_images: 1024              # synthetic only
      val_images: 512
    budget:                           # equal for every run
      by: steps                       # steps: optimizer steps at a fixed batch; time: seconds
      steps: 200                      # each run converts to steps by timing its own step first
      seconds: null
      batch: 32                       # per-rank images per optimizer step
    pretrain: [schedule.warmup_steps=20]         # overrides of every pretraining run
    recipe_overrides: {gpa: [masking.gpa.head=mean]}
    evaluations:
      pools: [cls, mean]              # features: CLS token and mean patch token, both reported
      knn: [data.batch_size=256]      # overrides of `mimscale knn`; null skips the protocol
      linprobe: [cache_features=true, schedule.epochs=30]
      masks: {images: 128}            # `analyze masks` of each run's own strategy; null skips
      untrained: true                 # a randomly initialised encoder of the same size, per seed
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from mimscale.config import ConfigError, available_recipes

POOLS = ("cls", "mean")
BUDGETS = ("steps", "time")
KEYS = ("out", "recipes", "seeds", "baseline", "teacher", "model", "data", "budget", "pretrain",
        "recipe_overrides", "evaluations")


@dataclass
class Study:
    file: str
    out: Path
    recipes: list[str]
    seeds: list[int]
    baseline: str
    teacher: str
    model: dict
    data: dict
    budget: dict
    pretrain: list[str]
    recipe_overrides: dict[str, list[str]]
    pools: list[str]
    knn: list[str] | None
    linprobe: list[str] | None
    masks: dict | None
    untrained: bool
    rows: list[str] = field(init=False)

    def __post_init__(self):
        self.rows = [*self.recipes, *(["untrained"] if self.untrained else [])]


def available_studies() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def _locate(path: str | os.PathLike) -> tuple[str, str]:
    """(file path or shipped name, its text)."""
    p = Path(path)
    if p.is_file():
        return str(p.resolve()), p.read_text()
    if str(path) in available_studies():
        res = resources.files(__name__).joinpath(f"{path}.yaml")
        return str(res), res.read_text()
    raise FileNotFoundError(f"study file {path} does not exist; shipped studies: {', '.join(available_studies())}")


def _strings(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
        raise ConfigError(f"{where}: expected a list of key=value overrides")
    return [str(v) for v in value]


def load_study(path: str | os.PathLike, out: str | None = None) -> Study:
    """Read and check a study file; the folder is ``out`` (else the file's ``out``)."""
    file, text = _locate(path)
    raw = yaml.safe_load(text)
    where = f"study {path}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level must be a mapping (see mimscale.downstream.studies)")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(KEYS)}")
    recipes = [str(r) for r in raw.get("recipes") or []]
    if not recipes or len(set(recipes)) != len(recipes):
        raise ConfigError(f"{where}: recipes must list distinct recipe names")
    shipped = available_recipes()
    for r in recipes:
        if r not in shipped and not Path(r).is_file():
            raise ConfigError(f"{where}: recipe {r!r} is neither shipped ({', '.join(shipped)}) nor a file")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds must be a list of distinct non-negative integers")
    baseline = str(raw.get("baseline", "mae"))
    if baseline not in recipes:
        raise ConfigError(f"{where}: baseline {baseline!r} is not one of the recipes {recipes}")
    model = dict(raw.get("model") or {})
    if "name" not in model:
        raise ConfigError(f"{where}: model needs a name (a build_mae preset, e.g. mae_vit_tiny_patch16)")
    data = {"dataset": "synthetic", "root": None, "train_images": 1024, "val_images": 512, **(raw.get("data") or {})}
    if data["dataset"] not in ("synthetic", "imagefolder"):
        raise ConfigError(f"{where}: data.dataset {data['dataset']!r} is not valid; valid: synthetic, imagefolder")
    if data["dataset"] == "imagefolder" and not data["root"]:
        raise ConfigError(f"{where}: data.root is required for imagefolder (a folder with train/ and val/)")
    budget = {"by": "steps", "steps": None, "seconds": None, "batch": 64, **(raw.get("budget") or {})}
    if budget["by"] not in BUDGETS:
        raise ConfigError(f"{where}: budget.by {budget['by']!r} is not valid; valid: {', '.join(BUDGETS)}")
    amount = "steps" if budget["by"] == "steps" else "seconds"
    if not isinstance(budget[amount], int | float) or budget[amount] <= 0:
        raise ConfigError(f"{where}: budget.{amount} must be a positive number with budget.by={budget['by']}")
    if not isinstance(budget["batch"], int) or budget["batch"] < 1:
        raise ConfigError(f"{where}: budget.batch must be a positive integer")
    evals = {"pools": list(POOLS), "knn": [], "linprobe": [], "masks": {}, "untrained": True,
             **(raw.get("evaluations") or {})}
    pools = [str(p) for p in evals["pools"] or []]
    if not pools or any(p not in POOLS for p in pools):
        raise ConfigError(f"{where}: evaluations.pools must list some of {', '.join(POOLS)}")
    overrides = raw.get("recipe_overrides") or {}
    stray = sorted(set(overrides) - set(recipes))
    if stray:
        raise ConfigError(f"{where}: recipe_overrides names recipe(s) {stray} that the study does not run")
    folder = out or raw.get("out") or f"runs/studies/{Path(str(path)).stem}"
    return Study(file, Path(folder).resolve(), recipes, seeds, baseline, str(raw.get("teacher", "study")),
                 model, data, budget, _strings(raw.get("pretrain"), f"{where}: pretrain"),
                 {k: _strings(v, f"{where}: recipe_overrides.{k}") for k, v in overrides.items()},
                 pools, None if evals["knn"] is None else _strings(evals["knn"], f"{where}: evaluations.knn"),
                 None if evals["linprobe"] is None else _strings(evals["linprobe"], f"{where}: evaluations.linprobe"),
                 None if evals["masks"] is None else dict(evals["masks"]), bool(evals["untrained"]))
