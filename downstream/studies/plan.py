"""The steps of a study and the files that mark them done.

Folder layout (``<out>`` is the study folder)::

    data/                              the generated shapes set (synthetic studies)
    runs/<recipe>_s<seed>/             a pretraining run; ``study_run.json`` marks it done and
                                       records its steps, images seen, wall time and FLOPs
    evals/<row>_s<seed>/<eval>/        knn_cls, knn_mean, linprobe_cls, linprobe_mean: the command's
                                       run folder, done when its ``results/*.json`` exists;
                                       masks: ``analyze masks`` output, done when ``masks.csv`` exists
    study.md, study.csv, runs.csv, figures/<metric>.png     the report

A step never reads another step's progress, only its marker, so a re-run (or a requeued job) does
exactly what is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mimscale.config import load_config

from . import Study

RUN_MARKER = "study_run.json"
UNTRAINED = "untrained"


@dataclass
class Step:
    name: str            # "pretrain/gpa_s0", "knn_cls/gpa_s0", "masks/gpa_s0"
    kind: str            # pretrain | knn | linprobe | masks
    row: str             # recipe, or "untrained"
    seed: int
    out: Path
    argv: list[str]      # ``mimscale <argv>``
    needs: list[str] = field(default_factory=list)

    def done(self) -> bool:
        if self.kind == "pretrain":
            return (self.out / RUN_MARKER).is_file()
        if self.kind == "masks":
            return (self.out / "masks.csv").is_file()
        return any((self.out / "results").glob("*.json"))


def run_name(row: str, seed: int) -> str:
    return f"{row}_s{seed}"


def data_root(study: Study) -> Path:
    return study.out / "data" if study.data["dataset"] == "synthetic" else Path(study.data["root"]).resolve()


def _model(study: Study) -> list[str]:
    return [f"model.{k}={v}" for k, v in study.model.items()]


def needs_teacher(recipe: str, overrides: list[str]) -> bool:
    """A recipe whose frozen teacher has no checkpoint yet (GPA's)."""
    cfg = load_config([f"recipe={recipe}", "data.source=synthetic", *overrides], require=False)
    return cfg.teacher.type == "frozen" and not cfg.teacher.checkpoint


def pretrain_steps(study: Study) -> list[Step]:
    b, steps = study.budget, []
    base = [*_model(study), "data.source=imagefolder", f"data.root={data_root(study) / 'train'}",
            f"data.batch_size={b['batch']}", "optim.accum_steps=1", *study.pretrain]
    if b["by"] == "steps":
        base.append(f"schedule.max_steps={int(b['steps'])}")
    for recipe in study.recipes:
        own = study.recipe_overrides.get(recipe, [])
        teacher = needs_teacher(recipe, base + own)
        for seed in study.seeds:
            out = study.out / "runs" / run_name(recipe, seed)
            argv = ["pretrain", f"recipe={recipe}", *base, *own, f"engine.seed={seed}"]
            needs = []
            if teacher:
                if study.teacher == "study":
                    if recipe == study.baseline:
                        raise ValueError(f"study {study.file}: the baseline {recipe!r} needs a teacher itself")
                    ckpt = study.out / "runs" / run_name(study.baseline, seed)
                    needs.append(f"pretrain/{run_name(study.baseline, seed)}")
                else:
                    ckpt = Path(study.teacher).resolve()
                argv.append(f"teacher.checkpoint={ckpt}")
            argv += [f"output.dir={out}", "resume=auto"]
            steps.append(Step(f"pretrain/{run_name(recipe, seed)}", "pretrain", recipe, seed, out, argv, needs))
    return steps


def _classify_data(study: Study) -> list[str]:
    d = study.data
    out = [f"data.dataset={d['dataset']}", f"data.root={data_root(study)}"]
    if d["dataset"] == "synthetic":
        out += [f"data.synthetic_images={d['train_images']}", f"data.synthetic_val_images={d['val_images']}",
                f"data.synthetic_size={study.model.get('img_size', 224)}"]
    return out


def eval_steps(study: Study) -> list[Step]:
    steps = []
    for row in study.rows:
        for seed in study.seeds:
            name = run_name(row, seed)
            folder = study.out / "evals" / name
            if row == UNTRAINED:  # the same encoder size, randomly initialised from the seed
                source, needs = _model(study), []
            else:
                run = study.out / "runs" / name
                source, needs = [f"checkpoint={run}"], [f"pretrain/{name}"]
            for kind, extra in (("knn", study.knn), ("linprobe", study.linprobe)):
                if extra is None:
                    continue
                for pool in study.pools:
                    out = folder / f"{kind}_{pool}"
                    argv = [kind, *source, *_classify_data(study), f"model.pool={pool}", f"engine.seed={seed}",
                            *extra, f"output.dir={out}", *(["resume=auto"] if kind == "linprobe" else [])]
                    steps.append(Step(f"{kind}_{pool}/{name}", kind, row, seed, out, argv, needs))
            if study.masks is not None and row != UNTRAINED:
                steps.append(_masks_step(study, row, seed, folder / "masks", needs))
    return steps


def _masks_step(study: Study, recipe: str, seed: int, out: Path, needs: list[str]) -> Step:
    m = study.masks
    run = study.out / "runs" / run_name(recipe, seed)
    strategy = load_config([f"recipe={recipe}", "data.source=synthetic", *study.recipe_overrides.get(recipe, [])],
                           require=False).masking.strategy
    argv = ["analyze", "masks", "--checkpoint", str(run), "--strategies", strategy,
            "--num-images", str(m.get("images", 128)), "--seed", str(seed), "--out", str(out),
            *(str(o) for o in m.get("overrides") or [])]
    return Step(f"masks/{run_name(recipe, seed)}", "masks", recipe, seed, out, argv, needs)


def plan(study: Study) -> list[Step]:
    """Every step, each after the steps it needs, seed by seed: a study stopped half-way has
    whole seeds (every row comparable) rather than some rows with every seed."""
    seed = {s: i for i, s in enumerate(study.seeds)}
    return sorted(pretrain_steps(study) + eval_steps(study),
                  key=lambda s: (seed[s.seed], s.kind != "pretrain", s.row != study.baseline))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
