"""SLURM submission with fake ``sbatch``/``squeue``/``sacct``/``scancel``/``srun`` on PATH.

The fakes stand in only for the cluster: submitit builds and submits the real sbatch script (the
fake ``sbatch`` keeps it and answers a job id), ``mimscale status`` asks the fake ``sacct`` the
state the test sets. What runs inside a job is tested through the local executor
(``test_slurm_local.py``).
"""

from __future__ import annotations

import os
import pickle
import stat
import textwrap
from pathlib import Path

import pytest

from mimscale.cli import main
from mimscale.slurm.book import RunBook
from mimscale.slurm.env import expand_nodelist, master_port, torch_env_from_slurm
from mimscale.slurm.executor import time_to_minutes
from mimscale.slurm.status import run_state

FAKES = {
    "sbatch": """\
        n=$(cat "$FAKE_SLURM/next_id" 2>/dev/null || echo 1000)
        echo $((n + 1)) > "$FAKE_SLURM/next_id"
        cp "$1" "$FAKE_SLURM/sbatch_$n.sh"
        echo "Submitted batch job $n"
        """,
    "sacct": """\
        cat "$FAKE_SLURM/sacct.txt" 2>/dev/null
        """,
    "squeue": """\
        exit 0
        """,
    "scancel": """\
        echo "$@" >> "$FAKE_SLURM/scancel.txt"
        """,
    "srun": """\
        exit 0
        """,
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    state.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(state))
    monkeypatch.chdir(tmp_path)
    return state


def _sacct(state: Path, **jobs: str) -> None:
    (state / "sacct.txt").write_text("".join(f"{j}|{s}\n" for j, s in jobs.items()))


def _sbatch_lines(script: Path) -> set[str]:
    return {line for line in script.read_text().splitlines() if line.startswith("#SBATCH")}


def _tiny(tmp_path) -> list[str]:
    return ["model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8",
            "data.source=synthetic", f"data.root={tmp_path / 'data'}", "schedule.max_steps=5"]


def test_launch_writes_the_sbatch_script_and_records_the_job(fake_slurm, tmp_path, capsys):
    run = tmp_path / "runs" / "vitl"
    code = main(["launch", "pretrain", *_tiny(tmp_path), f"output.dir={run}",
                 "--nodes", "2", "--gpus-per-node", "8", "--partition", "learn", "--time", "2-00:00:00",
                 "--account", "proj", "--qos", "high", "--constraint", "a100", "--mem", "480G",
                 "--cpus-per-task", "10", "--exclude", "node[01-02]", "--comment", "vitl 800ep",
                 "--mail", "me@example.org", "--setup", "module load cuda"])
    assert code == 0
    script = fake_slurm / "sbatch_1000.sh"
    lines = _sbatch_lines(script)
    for expected in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=2880",
                     "--partition=learn", "--account=proj", "--qos=high", "--constraint=a100",
                     "--mem=480G", "--cpus-per-task=10", "--exclude='node[01-02]'",
                     "--comment='vitl 800ep'", "--mail-user=me@example.org", "--mail-type=END,FAIL",
                     "--signal=USR2@120", "--requeue", "--job-name=mimscale-pretrain"]:
        assert f"#SBATCH {expected}" in lines, (expected, lines)
    text = script.read_text()
    assert "module load cuda" in text and "srun" in text and "submitit.core._submit" in text
    assert str(run / "submitit") in text  # every rank's log goes to the run folder

    # job-id bookkeeping and the pickled job: same command, pinned run folder, resume=auto
    events = RunBook(run).events()
    assert [(e["event"], e["job_id"]) for e in events] == [("submitted", "1000")]
    delayed = pickle.loads((run / "submitit" / "1000_submitted.pkl").read_bytes())
    job = delayed.function
    assert job.argv[0] == "pretrain" and f"output.dir={run}" in job.argv and job.argv[-1] == "resume=auto"
    assert (run / "launch.json").is_file()
    assert "submitted job 1000" in capsys.readouterr().out


def test_dry_run_prints_the_script_and_submits_nothing(fake_slurm, tmp_path, capsys):
    run = tmp_path / "dry"
    assert main(["launch", "pretrain", *_tiny(tmp_path), f"output.dir={run}", "--gpus-per-node", "4",
                 "--time", "90", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=4" in out and "#SBATCH --time=90" in out
    assert f"output.dir={run} resume=auto" in out
    assert not list(fake_slurm.glob("sbatch_*")) and not run.exists()


def test_bad_config_or_options_fail_before_anything_is_queued(fake_slurm, tmp_path, capsys):
    assert main(["launch", "pretrain", *_tiny(tmp_path), "optim.bogus=1"]) == 2
    assert "unknown key 'optim.bogus'" in capsys.readouterr().err
    assert main(["launch", "pretrain", *_tiny(tmp_path), "--time", "soon"]) == 2
    assert "--time 'soon'" in capsys.readouterr().err
    assert main(["launch", "nosuchcommand"]) == 2
    assert "valid:" in capsys.readouterr().err
    assert not list(fake_slurm.glob("sbatch_*"))


SWEEP = """\
    vars: {{out: {out}, data: {data}}}
    common: [model.name=mae_vit_tiny_patch16, model.img_size=32, model.patch_size=8,
             data.source=synthetic, "data.root={{data}}", schedule.max_steps=5]
    jobs:
      - name: ratio
        command: pretrain
        grid: {{masking.ratio: [0.5, 0.6, 0.75]}}
"""


def test_sweep_submits_one_array_and_resubmission_skips_done_and_active(fake_slurm, tmp_path, capsys):
    out = tmp_path / "sweep"
    file = tmp_path / "ratios.yaml"
    file.write_text(textwrap.dedent(SWEEP.format(out=out, data=tmp_path / "data")))

    assert main(["sweep", str(file), "--dry-run", "--array-parallelism", "2"]) == 0
    listing = capsys.readouterr().out
    assert "3 to submit" in listing and "ratio_0.75" in listing and "#SBATCH --array=0-2%2" in listing
    assert not list(fake_slurm.glob("sbatch_*"))

    assert main(["sweep", str(file), "--array-parallelism", "2", "--time", "60"]) == 0
    lines = _sbatch_lines(fake_slurm / "sbatch_1000.sh")
    assert "#SBATCH --array=0-2%2" in lines and "#SBATCH --time=60" in lines
    names = ["ratio_0.5", "ratio_0.6", "ratio_0.75"]
    for i, name in enumerate(names):
        assert RunBook(out / name).job_ids() == [f"1000_{i}"]
        job = pickle.loads((out / "submitit" / f"1000_{i}_submitted.pkl").read_bytes()).function
        assert f"masking.ratio={[0.5, 0.6, 0.75][i]}" in job.argv and f"output.dir={out / name}" in job.argv

    # element 0 finished, element 1 is running, element 2 failed: only element 2 goes again
    RunBook(out / names[0]).record("done", job_id="1000_0")
    RunBook(out / names[2]).record("failed", job_id="1000_2", error="RuntimeError: CUDA out of memory")
    _sacct(fake_slurm, **{"1000_1": "RUNNING", "1000_2": "FAILED"})
    capsys.readouterr()
    assert main(["status", str(out)]) == 1  # a failed element
    table = capsys.readouterr().out
    assert "ratio_0.5" in table and "done" in table and "running" in table
    assert "RuntimeError: CUDA out of memory" in table

    assert main(["sweep", str(file)]) == 0
    lines = _sbatch_lines(fake_slurm / "sbatch_1001.sh")  # a single element: a plain job, no array
    assert not any(line.startswith("#SBATCH --array") for line in lines)
    assert RunBook(out / names[2]).job_ids() == ["1000_2", "1001"]
    assert RunBook(out / names[0]).job_ids() == ["1000_0"] and RunBook(out / names[1]).job_ids() == ["1000_1"]

    # --cancel: scancel for the active elements only (1000_1 running, 1001 pending)
    _sacct(fake_slurm, **{"1000_1": "RUNNING", "1001": "PENDING"})
    capsys.readouterr()
    main(["status", str(out), "--cancel"])
    assert (fake_slurm / "scancel.txt").read_text().split() == ["1000_1", "1001"]
    assert "cancelled 2 job(s)" in capsys.readouterr().out


def test_sweep_files_keep_literal_braces_and_need_no_checkpoint(tmp_path):
    from mimscale.downstream.sweeps import expand

    file = tmp_path / "wds.yaml"
    file.write_text("vars: {data: /d}\ncommon: ['data.urls={data}/train-{{000000..000009}}.tar']\n"
                    "jobs: [{name: a, command: pretrain, grid: {recipe: [mae, gpa]}}]\n")
    jobs = expand(file)
    assert [j.name for j in jobs] == ["a_mae", "a_gpa"]
    assert jobs[0].argv == ["pretrain", "data.urls=/d/train-{000000..000009}.tar", "recipe=mae",
                            "output.dir=runs/sweeps/wds/a_mae"]


def test_status_follows_the_scheduler_and_the_job_history(fake_slurm, tmp_path):
    run = tmp_path / "run"
    book = RunBook(run)
    book.record("submitted", job_id="77", cluster="slurm")
    _sacct(fake_slurm, **{"77": "PENDING"})
    assert run_state(run).state == "queued"
    book.record("started", job_id="77", attempt=1, log=str(tmp_path / "77_0_log.err"))
    _sacct(fake_slurm, **{"77": "RUNNING"})
    assert run_state(run).state == "running"
    book.record("requeued", job_id="77")  # preempted: SLURM requeues the same job id
    _sacct(fake_slurm, **{"77": "PENDING"})
    state = run_state(run)
    assert (state.state, state.requeues, state.job_ids) == ("queued", 1, ["77"])
    book.record("started", job_id="77", attempt=2, log=str(tmp_path / "77_0_log.err"))
    (tmp_path / "77_0_log.err").write_text("step 10: loss=1.0\nslurmstepd: error: Detected 1 oom_kill event\n")
    _sacct(fake_slurm, **{"77": "OUT_OF_MEMORY"})
    state = run_state(run)
    assert state.state == "failed" and "OUT_OF_MEMORY" in state.detail and "oom_kill" in state.detail
    book.record("submitted", job_id="78", cluster="slurm")  # submitted again: a new job id
    book.record("started", job_id="78", attempt=1)
    book.record("done", job_id="78")
    state = run_state(run)
    assert (state.state, state.requeues, state.job_ids) == ("done", 1, ["77", "78"])


def test_status_of_a_folder_that_was_never_launched(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "neither a launched run" in capsys.readouterr().err


def test_slurm_variables_become_torch_distributed_variables():
    assert expand_nodelist("gpu[001-003,010],login1,n[8-10]x") == [
        "gpu001", "gpu002", "gpu003", "gpu010", "login1", "n8x", "n9x", "n10x"]
    env = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_STEP_NODELIST": "node[07-08]", "SLURM_JOB_ID": "4242"}
    assert torch_env_from_slurm(env) == {
        "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "node07", "MASTER_PORT": str(master_port("4242"))}
    # the batch script itself (no srun step) is one process, whatever the allocation's size
    assert torch_env_from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "n1"}) == {}
    assert 20000 <= master_port("4242") < 60000


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("72:00:00", 4320),
                                           ("1-12", 2160), ("2-00:30:00", 2910)])
def test_time_formats(text, minutes):
    assert time_to_minutes(text) == minutes
