"""Benchmark sweep files: one base command per job plus its ``key=value`` overrides, optionally a
grid of values; ``{name}`` placeholders are filled from the file's ``vars`` and the command line
(``{{`` and ``}}`` stay literal braces).

Format (``standard.yaml`` is the full benchmark suite of one checkpoint)::

    vars:                       # placeholders; a null one must be given when the sweep is expanded
      checkpoint: null
      data: /datasets
      out: runs/benchmarks
    common: [engine.precision=bf16]          # overrides of every job
    jobs:
      - name: in1k_finetune                  # the job's folder: {out}/{name}
        command: finetune                    # a mimscale command: finetune | linprobe | knn | ...
        overrides: [data.dataset=imagenet, "data.root={data}/imagenet"]
      - name: semi
        command: finetune
        grid: {data.subset: [0.01, 0.1]}     # one job per combination: semi_0.01, semi_0.1
        overrides: [data.dataset=imagenet, "data.root={data}/imagenet"]

Every job gets ``output.dir={out}/{job name}`` (``out`` defaults to ``runs/sweeps/<file name>``)
and, when the file declares a ``checkpoint`` variable, ``checkpoint={checkpoint}``; a grid key can
be used as a placeholder (``{data.dataset}``). A pretraining sweep is the same format, e.g.
``command: pretrain`` with ``grid: {recipe: [mae, gpa], masking.ratio: [0.6, 0.75]}``.
``expand`` turns a file into the argument lists of ``mimscale``; ``mimscale sweep`` submits them
as one job array (``mimscale.slurm.sweep``), and
``python -m mimscale.downstream.sweeps FILE checkpoint=... | sh`` runs them one after another here.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.]+)\}")


@dataclass(frozen=True)
class SweepJob:
    name: str
    argv: list[str]   # arguments of ``mimscale`` (``mimscale.cli.main(argv)``)

    def command_line(self) -> str:
        return shlex.join(["mimscale", *self.argv])


def available_sweeps() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def _read(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        if str(path) in available_sweeps():
            return yaml.safe_load(resources.files(__name__).joinpath(f"{path}.yaml").read_text())
        raise FileNotFoundError(f"sweep file {path} does not exist; shipped sweeps: {', '.join(available_sweeps())}")
    data = yaml.safe_load(p.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise ValueError(f"sweep file {path}: needs a top-level 'jobs' list (see mimscale.downstream.sweeps)")
    return data


def _fill(text: str, values: dict, where: str) -> str:
    def sub(m):
        key = m.group(1)
        if key not in values:
            raise ValueError(f"{where}: unknown placeholder {{{key}}}; valid: {', '.join(sorted(values))}")
        if values[key] is None:
            raise ValueError(f"{where}: {{{key}}} has no value; give {key}=... when expanding the sweep")
        return str(values[key])
    # ``{{`` and ``}}`` are literal braces (a shard pattern such as ``train-{{000000..001281}}.tar``)
    parts = re.split(r"(\{\{|\}\})", text)
    return "".join(p[0] if p in ("{{", "}}") else _PLACEHOLDER.sub(sub, p) for p in parts)


def expand(path: str | os.PathLike, variables: dict | None = None) -> list[SweepJob]:
    """The jobs of a sweep file (a path or a shipped sweep's name), placeholders filled."""
    data = _read(path)
    values = {"out": f"runs/sweeps/{Path(str(path)).stem}", **(data.get("vars") or {})}
    unknown = set(variables or {}) - set(values)
    if unknown:
        raise ValueError(f"sweep {path}: unknown variable(s) {sorted(unknown)}; valid: {', '.join(values)}")
    values.update(variables or {})
    common = [str(o) for o in data.get("common") or []]
    jobs, names = [], set()
    for i, job in enumerate(data["jobs"]):
        where = f"sweep {path} job {job.get('name', i)}"
        missing = [k for k in ("name", "command") if k not in job]
        if missing:
            raise ValueError(f"{where}: missing {missing}; a job has name, command, overrides and an optional grid")
        grid = job.get("grid") or {}
        for combo in itertools.product(*grid.values()) if grid else [()]:
            point = dict(zip(grid, combo))
            name = "_".join([job["name"], *(re.sub(r"[^A-Za-z0-9.%-]+", "-", str(v)) for v in combo)])
            if name in names:
                raise ValueError(f"{where}: two jobs are named {name}")
            names.add(name)
            local = {**values, **point, "name": name}
            overrides = [*common, *(str(o) for o in job.get("overrides") or []),
                         *(f"{k}={v}" for k, v in point.items()),
                         *(["checkpoint={checkpoint}"] if "checkpoint" in values else []),
                         "output.dir={out}/{name}"]
            argv = [*str(job["command"]).split(), *(_fill(o, local, where) for o in overrides)]
            jobs.append(SweepJob(name, argv))
    return jobs
