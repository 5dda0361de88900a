"""What a run tells its user: the unreadable samples it skipped (count in the metrics, the
progress line and the last line; the list in the run folder; across a resume and over ranks), how
it ended (finished, or stopped early by a signal), one memory report per start."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from distributed_utils import one_thread, spawn, tiny_overrides  # noqa: F401  (autouse fixture)

from mimscale.config import load_config
from mimscale.data_pipeline.build import build_pretrain_data
from mimscale.data_pipeline.synthetic import write_imagefolder
from mimscale.pretrain.engine.checkpoint import read_state
from mimscale.pretrain.engine.logger import RunLogger, read_metrics
from mimscale.pretrain.engine.memory import read_reports
from mimscale.pretrain.engine.trainer import Trainer

# three damaged images and the reason the run must give for each
DAMAGE = {"garbage": (lambda b: b"garbage" * 9, "not an image (unrecognised format; it begins b'garbagegarba')"),
          "empty": (lambda b: b"", "zero-byte file"),
          "truncated": (lambda b: b[:60], "truncated PNG")}


def _overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return tiny_overrides(out, root) + ["data.source=imagefolder", f"data.root={root}",
                                        "data.max_bad_fraction=0.2", *extra]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """48 images (one epoch = 6 batches of 8 on one rank), one damaged in batches 0, 3 and 5 of
    epoch 0; returns the root and ``{key: (batch, reason)}`` of the damaged ones."""
    root = tmp_path_factory.mktemp("damaged")
    folder = write_imagefolder(root, 48, size=40)
    cfg = load_config(_overrides(root, root / "unused"))
    data = build_pretrain_data(cfg.data, cfg.model.img_size, cfg.engine.seed)
    batches = [b["index"].tolist() for _, b in zip(range(6), data)]
    out = {}
    for batch, (damage, reason) in zip((0, 3, 5), DAMAGE.values()):
        path = Path(data.source.path(batches[batch][1]))
        path.write_bytes(damage(path.read_bytes()))
        out[os.path.relpath(path, folder)] = (batch, reason)
    return root, out


def test_bad_samples_are_counted_listed_and_carried_across_a_resume(damaged, tmp_path, monkeypatch, capsys):
    """Stopped by a signal after step 3 (batch 3 already fetched ahead), then resumed to the end of
    the epoch: the count in the metrics is the run's, each damaged sample is listed once with its
    reason, the last lines say how each start ended, and memory.json keeps both starts' reports."""
    root, bad = damaged
    extra = ["schedule.max_steps=6", "output.checkpoint_every=100", "engine.preempt_signals=[SIGUSR2]",
             "engine.memory_report_steps=1"]
    run = tmp_path / "run"
    trainer = Trainer(load_config(_overrides(root, run, *extra)))
    real_forward = type(trainer.method).forward

    def forward(self, images, generator, *views):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGUSR2)  # during step 3: the run stops after it
        return real_forward(self, images, generator, *views)

    monkeypatch.setattr(type(trainer.method), "forward", forward)
    stopped = trainer.fit()
    monkeypatch.undo()
    assert (stopped.steps, stopped.bad_samples) == (3, 1)
    assert stopped.describe().startswith("stopped early by SIGUSR2 at step 3 of 6: 3 steps in ")
    assert "(continue with resume=auto); 1 unreadable sample skipped, listed in" in stopped.describe()
    assert read_state(stopped.checkpoint)["bad_samples"] == 1
    listed = run / "bad_samples.jsonl"
    assert len(listed.read_text().splitlines()) == 1  # not batch 3's: fetched ahead, put back

    resumed = Trainer(load_config(_overrides(root, run, *extra, "resume=auto")))
    rest = resumed.fit()
    assert rest.bad_samples == 3 and rest.steps == 6
    assert rest.describe().startswith("done: 3 steps in ")
    assert "s since this start (resumed at step 3); checkpoint " in rest.describe()
    assert rest.describe().endswith(f"; 3 unreadable samples skipped, listed in {listed}")

    assert [r["bad_samples"] for r in read_metrics(run / "metrics.jsonl")] == [1, 1, 1, 2, 2, 3]
    records = [json.loads(line) for line in listed.read_text().splitlines()]
    assert {r["key"]: (r["batch"], r["reason"]) for r in records} == bad and len(records) == 3
    assert all(r["epoch"] == 0 and r["rank"] == 0 and Path(r["shard"]) == root / "train" for r in records)

    reports = read_reports(run / "memory.json")  # one per start, the earlier one kept
    assert [(r["start_step"], r["step"]) for r in reports] == [(0, 1), (3, 4)]


def test_the_progress_line_shows_bad_samples_once_there_are_some(tmp_path, capsys):
    logger = RunLogger(tmp_path, True, 10, tensorboard=False, progress="off")
    logger.log(1, {"loss": 0.5, "bad_samples": 0})
    logger.log(2, {"loss": 0.4, "bad_samples": 2})
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["step 1: loss=0.5", "step 2: loss=0.4 bad_samples=2"]


def _cli_rank(rank, world, overrides, out_dir):
    sys.stdout = open(Path(out_dir) / f"rank{rank}.txt", "w")  # noqa: SIM115 - this process's output
    from mimscale.cli import main

    try:
        assert main(["pretrain", *overrides]) == 0
    finally:
        sys.stdout.close()


@pytest.mark.slow
def test_two_ranks_sum_their_bad_samples_and_only_rank_0_reports(damaged, tmp_path):
    """Two ranks (16 samples a step): one epoch of 48 is 3 steps, and all three damaged images are
    read, by whichever rank; the count is their sum, the list has each, one last line is printed."""
    root, bad = damaged
    run = tmp_path / "run"
    spawn(_cli_rank, 2, _overrides(root, run, "schedule.max_steps=3", "engine.memory_report_steps=0"),
          str(tmp_path), timeout=300)
    assert read_metrics(run / "metrics.jsonl")[-1]["bad_samples"] == 3
    records = [json.loads(line) for line in (run / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in records) == sorted(bad) and {r["rank"] for r in records} <= {0, 1}
    last = (tmp_path / "rank0.txt").read_text().splitlines()[-1]
    assert last.startswith("done: 3 steps in ") and "3 unreadable samples skipped" in last
    assert "done:" not in (tmp_path / "rank1.txt").read_text()
