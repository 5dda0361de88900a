"""``mimscale study``: a 2-recipe x 2-seed study at the smallest size through the CLI; the table
against the runs' own result files, the resume, the figures; the file checks and the SLURM plan."""

import csv
import json
import pickle
import statistics

import pytest
import yaml
from test_slurm import fake_slurm  # noqa: F401  (the fake sbatch/sacct on PATH)

from mimscale.cli import main
from mimscale.downstream.results import read_results
from mimscale.downstream.studies import load_study
from mimscale.downstream.studies.plan import plan
from mimscale.downstream.studies.report import summarize

SMALL = {
    "recipes": ["mae", "block"],
    "seeds": [0, 1],
    "model": {"name": "mae_vit_tiny_patch16", "img_size": 32, "patch_size": 8},
    "data": {"dataset": "synthetic", "train_images": 36, "val_images": 18},
    "budget": {"by": "steps", "steps": 2, "batch": 6},
    "pretrain": ["model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
                 "schedule.warmup_steps=1", "engine.precision=fp32", "engine.threads=1", "data.num_workers=0",
                 "logging.log_every=1", "logging.image_every=0", "logging.tensorboard=false",
                 "logging.progress=off", "engine.memory_report_steps=0"],
    "evaluations": {"pools": ["cls", "mean"], "linprobe": None, "masks": None, "untrained": True,
                    "knn": ["knn.k=5", "data.num_workers=0", "engine.precision=fp32", "engine.threads=1",
                            "output.tensorboard=false", "output.progress=off"]},
}


def write_study(tmp_path, **changes) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**SMALL, **changes}))
    return str(path)


def test_study_table_resume_and_figures(tmp_path, capsys):
    file, out = write_study(tmp_path), tmp_path / "out"
    assert main(["study", file, "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "16 steps, 0 done, 16 to run" in first

    # the table: mean and sample std over seeds of each run's own result file, paired difference to mae
    knn = {}
    for record in read_results(out / "evals"):
        row_seed, pool = record["_path"].split("/evals/")[1].split("/")[:2]
        row, seed = row_seed.rsplit("_s", 1)
        knn[(row, int(seed), pool)] = record["value"]
    assert len(knn) == 3 * 2 * 2
    with open(out / "study.csv", newline="") as f:
        table = {(r["row"], r["metric"]): r for r in csv.DictReader(f)}
    for row in ("mae", "block", "untrained"):
        for pool in ("cls", "mean"):
            values = [knn[(row, s, f"knn_{pool}")] for s in (0, 1)]
            cell = table[(row, f"knn_{pool}")]
            assert int(cell["n"]) == 2
            assert float(cell["mean"]) == pytest.approx(statistics.fmean(values), abs=1e-4)
            assert float(cell["std"]) == pytest.approx(statistics.stdev(values), abs=1e-4)
            if row != "mae":
                diffs = [knn[(row, s, f"knn_{pool}")] - knn[("mae", s, f"knn_{pool}")] for s in (0, 1)]
                assert float(cell["diff_mean"]) == pytest.approx(statistics.fmean(diffs), abs=1e-4)
                assert float(cell["diff_std"]) == pytest.approx(statistics.stdev(diffs), abs=1e-4)
    # the cost columns come from each run's record: 2 steps x 6 images, FLOPs counted
    run = json.loads((out / "runs" / "block_s1" / "study_run.json").read_text())
    assert run["steps"] == 2 and run["images_seen"] == 12 and run["flops"] > 0 and run["wall_s"] > 0
    assert float(table[("block", "images_seen")]["mean"]) == 12
    md = (out / "study.md").read_text()
    assert "| untrained | 2 |" in md and "Paired difference to `mae`" in md and "Beyond the seed spread" in md

    for metric in ("knn_cls", "knn_mean"):
        assert (out / "figures" / f"{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the resume: a second run trains and evaluates nothing, and rewrites the same table
    checkpoints = sorted((out / "runs").glob("*/checkpoints/*/state.pt"))
    stamps = [p.stat().st_mtime_ns for p in checkpoints]
    results = sorted((out / "evals").glob("*/*/results/*.json"))
    result_stamps = [p.stat().st_mtime_ns for p in results]
    before = (out / "study.csv").read_text()
    assert main(["study", file, "--out", str(out)]) == 0
    second = capsys.readouterr().out
    assert "16 steps, 16 done, 0 to run" in second and "mimscale pretrain" not in second
    assert [p.stat().st_mtime_ns for p in checkpoints] == stamps
    assert [p.stat().st_mtime_ns for p in results] == result_stamps
    assert (out / "study.csv").read_text() == before


def test_gpa_waits_for_the_study_mae_and_slurm_submits_waves(fake_slurm, tmp_path, capsys):  # noqa: F811
    file = write_study(tmp_path, recipes=["mae", "gpa"], recipe_overrides={"gpa": ["masking.gpa.head=mean"]},
                       evaluations={**SMALL["evaluations"], "masks": {"images": 8}})
    out = tmp_path / "out"
    steps = {s.name: s for s in plan(load_study(file, str(out)))}
    gpa = steps["pretrain/gpa_s1"]
    assert gpa.needs == ["pretrain/mae_s1"]
    assert f"teacher.checkpoint={out / 'runs' / 'mae_s1'}" in gpa.argv
    assert steps["masks/gpa_s0"].argv[steps["masks/gpa_s0"].argv.index("--strategies") + 1] == "gpa"
    assert "masks/untrained_s0" not in steps

    # wave 1: the mae runs and the untrained encoder's evaluations need nothing; the rest waits
    args = ["study", file, "--out", str(out), "--cluster", "slurm", "--time", "30"]
    assert main([*args, "--dry-run"]) == 0
    assert "6 to submit, 14 waiting on others" in capsys.readouterr().out
    assert not list(fake_slurm.glob("sbatch_*"))
    assert main(args) == 0
    assert "#SBATCH --array=0-5%6" in (fake_slurm / "sbatch_1000.sh").read_text()
    jobs = [pickle.loads(p.read_bytes()).function for p in sorted((out / "submitit").glob("1000_*_submitted.pkl"))]
    assert sorted(j.argv[-1] for j in jobs) == ["knn_cls/untrained_s0", "knn_cls/untrained_s1", "knn_mean/untrained_s0",
                                                 "knn_mean/untrained_s1", "pretrain/mae_s0", "pretrain/mae_s1"]
    assert all(j.argv[:4] == ["study", file, "--out", str(out)] for j in jobs)

    # the mae runs end (their marker); wave 2: GPA and the mae evaluations, nothing queued twice
    for seed in (0, 1):
        (out / "runs" / f"mae_s{seed}" / "study_run.json").write_text("{}")
    capsys.readouterr()
    assert main(args) == 0
    assert "8 to submit, 6 waiting on others" in capsys.readouterr().out
    assert "#SBATCH --array=0-7%8" in (fake_slurm / "sbatch_1001.sh").read_text()


def test_time_budget_converts_at_the_run_s_own_step_time(tmp_path, capsys):
    none = {"knn": None, "linprobe": None, "masks": None, "untrained": False}
    file = write_study(tmp_path, recipes=["mae"], seeds=[0], budget={"by": "time", "seconds": 1.5, "batch": 6},
                       evaluations=none)
    out = tmp_path / "out"
    assert main(["study", file, "--out", str(out)]) == 0
    calibration = json.loads((out / "runs" / "mae_s0" / "study_budget.json").read_text())
    assert calibration["steps"] == max(1, int(1500 / calibration["step_ms"]))
    run = json.loads((out / "runs" / "mae_s0" / "study_run.json").read_text())
    assert run["steps"] == calibration["steps"] and run["budget"] == "time"
    assert "1.5 s of training" in (out / "study.md").read_text()


def test_paired_difference_uses_the_same_seed(tmp_path):
    study = load_study(write_study(tmp_path, seeds=[0, 1, 2]), str(tmp_path / "out"))
    runs = {("mae", 0): {"knn_cls": 50.0}, ("mae", 1): {"knn_cls": 60.0}, ("mae", 2): {"knn_cls": 70.0},
            ("block", 0): {"knn_cls": 52.0}, ("block", 1): {"knn_cls": 61.0}}  # block s2 missing
    cell = next(r for r in summarize(study, runs) if r["row"] == "block" and r["metric"] == "knn_cls")
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(56.5)
    assert cell["diff_n"] == 2 and cell["diff_mean"] == pytest.approx(1.5)
    assert cell["diff_std"] == pytest.approx(statistics.stdev([2.0, 1.0]))


@pytest.mark.parametrize("change, message", [
    ({"baseline": "ccmim"}, "baseline 'ccmim' is not one of the recipes"),
    ({"budget": {"by": "flops"}}, "budget.by 'flops' is not valid"),
    ({"budget": {"by": "time"}}, "budget.seconds must be a positive number"),
    ({"recipes": ["mae", "nope"]}, "recipe 'nope' is neither shipped"),
    ({"seeds": [0, 0]}, "seeds must be a list of distinct"),
    ({"evaluations": {"pools": ["max"]}}, "evaluations.pools must list some of cls, mean"),
    ({"colour": 1}, "unknown key(s) ['colour']"),
])
def test_bad_study_files_say_what_is_wrong(tmp_path, capsys, change, message):
    assert main(["study", write_study(tmp_path, **change), "--list"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_shipped_studies_plan():
    tiny = load_study("tiny")
    assert tiny.recipes == ["mae", "block", "idm", "gpa", "ccmim", "sbam_amr", "cmae_2shot", "gpa_2shot_guided"]
    assert len(tiny.seeds) == 3
    steps = plan(tiny)
    assert sum(s.kind == "pretrain" for s in steps) == 24
    assert sum(s.kind == "knn" for s in steps) == 9 * 3 * 2
    vitb = load_study("vitb", "/tmp/x")
    assert vitb.model["name"] == "mae_vit_base_patch16" and vitb.data["dataset"] == "imagefolder"
