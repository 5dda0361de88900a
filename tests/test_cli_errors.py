"""Bad input to any command ends as one line on stderr naming the bad thing, exit code 2 and no
traceback; ``--debug`` / ``MIMSCALE_DEBUG=1`` add the traceback."""

import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from mimscale.cli import main
from mimscale.pretrain.models import build_mae

TINY = ["model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8", "model.decoder_embed_dim=32",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "data.source=synthetic", "data.synthetic_images=16",
        "data.synthetic_size=40", "data.batch_size=8", "data.num_workers=0", "engine.precision=fp32",
        "logging.log_every=1", "logging.image_every=0", "logging.progress=off", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Paths a command may be given: a missing one, an empty folder, a tiny mimscale run and broken
    checkpoints (random bytes, a truncated file, a step folder whose state.pt is random bytes)."""
    root = tmp_path_factory.mktemp("bad")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIMSCALE_CACHE", str(root / "cache"))
        assert main(["pretrain", *TINY, "schedule.max_steps=1", f"output.dir={root / 'run'}"]) == 0
    (root / "empty").mkdir()
    (root / "junk.pth").write_bytes(os.urandom(4096))
    torch.save(build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, decoder_depth=1).state_dict(),
               root / "whole.pth")
    data = (root / "whole.pth").read_bytes()
    (root / "truncated.pth").write_bytes(data[: len(data) // 2])
    junk_step = root / "junkrun" / "checkpoints" / "step_00000001"
    junk_step.mkdir(parents=True)
    (junk_step / "state.pt").write_bytes(os.urandom(4096))
    (junk_step / "COMPLETE").write_text("")
    tarfile.open(root / "nosamples.tar", "w").close()  # a valid tar without one image
    (root / "zero.tar").write_bytes(b"")
    (root / "text.tar").write_text("not a tar\n")
    (root / "index.json").write_text(json.dumps({"wids_version": 1, "shardlist": []}))
    return {"missing": str(root / "nope"), "empty": str(root / "empty"), "run": str(root / "run"),
            "step": str(root / "run" / "checkpoints" / "step_00000001"),
            "junk": str(root / "junk.pth"), "truncated": str(root / "truncated.pth"), "junkstep": str(junk_step),
            "root": root}


def refuse(capsys, argv, *names):
    """``argv`` exits 2 with one stderr line naming the command and every one of ``names``."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mimscale {argv[0]}: "), err
    for name in names:
        assert name in lines[0], err


# (argv, names the message must hold); {key} is replaced by the path of that kind from `bad`.
CASES = {
    "pretrain-type": (["pretrain", "optim.blr=abc"], ["optim.blr", "abc"]),
    "pretrain-range": (["pretrain", "masking.ratio=1.5"], ["masking.ratio"]),
    "pretrain-unknown-key": (["pretrain", "optim.bogus=1"], ["optim.bogus"]),
    "pretrain-missing-root": (["pretrain", "recipe=mae"], ["data.root"]),
    "pretrain-root-not-found": (["pretrain", "data.source=imagefolder", "data.root={missing}"], ["{missing}"]),
    "pretrain-root-empty": (["pretrain", "data.source=imagefolder", "data.root={empty}"], ["{empty}"]),
    "pretrain-teacher-missing": (["pretrain", *TINY, "recipe=gpa", "teacher.checkpoint={missing}"], ["{missing}"]),
    "pretrain-teacher-empty": (["pretrain", *TINY, "recipe=gpa", "teacher.checkpoint={empty}"], ["{empty}"]),
    "pretrain-teacher-junk": (["pretrain", *TINY, "recipe=gpa", "teacher.checkpoint={junk}"], ["{junk}"]),
    "pretrain-teacher-truncated": (["pretrain", *TINY, "recipe=gpa", "teacher.checkpoint={truncated}"],
                                   ["{truncated}"]),
    "pretrain-teacher-width": (["pretrain", *TINY, "recipe=gpa", "model.name=mae_vit_small_patch16",
                                "masking.gpa.head=0", "teacher.checkpoint={step}"], ["teacher"]),
    # shard patterns and sources (what the data pipeline refuses at start)
    "pretrain-urls-s3": (["pretrain", *TINY, "data.source=wds", "data.urls=s3://bucket/x-{{000..001}}.tar"],
                         ["s3://bucket/x-000.tar", "unsupported scheme", "pipe:"]),
    "pretrain-urls-http": (["pretrain", *TINY, "data.source=wds", "data.urls=http://host/x.tar"],
                           ["http://host/x.tar", "pipe:curl", "data.allow_pipe=true"]),
    "pretrain-urls-reversed": (["pretrain", *TINY, "data.source=wds", "data.urls={root}/x-{{000005..000001}}.tar"],
                               ["{{000005..000001}}", "is empty"]),
    "pretrain-urls-one-brace": (["pretrain", *TINY, "data.source=wds", "data.urls={root}/shard-{{000000}}.tar"],
                                ["cannot expand {{000000}}"]),
    "pretrain-urls-empty-index": (["pretrain", *TINY, "data.source=wds", "data.urls={root}/index.json"],
                                  ["index.json lists no shards", "{{'url': ..., 'nsamples': ...}}"]),
    "pretrain-urls-no-samples": (["pretrain", *TINY, "data.source=wds", "data.urls={root}/nosamples.tar"],
                                 ["hold no samples", "nosamples.tar"]),
    "pretrain-urls-zero-bytes": (["pretrain", *TINY, "data.source=wds", "data.urls=[{root}/nosamples.tar,{root}/zero.tar]"],
                                 ["shard {root}/zero.tar is not a tar file"]),
    "pretrain-urls-not-a-tar": (["pretrain", *TINY, "data.source=wds", "data.urls={root}/text.tar"],
                                ["shard {root}/text.tar is not a tar file"]),
    "pretrain-too-few-samples": (["pretrain", *TINY, "data.batch_size=32"], ["16 samples cannot fill one batch of 32"]),
    "pretrain-beton-missing": (["pretrain", *TINY, "data.source=ffcv", "data.urls={missing}.beton"],
                               ["{missing}.beton"]),
    "pretrain-offload-on-cpu": (["pretrain", *TINY, "engine.device=cpu", "engine.backend=fsdp", "engine.cpu_offload=true",
                                 "output.dir={root}/offload"], ["engine.cpu_offload", "engine.device=cpu"]),
    "pretrain-recipe-missing": (["pretrain", "recipe={missing}.yaml"], ["{missing}.yaml"]),
    "demo-gpa-head": (["demo", "recipe=gpa", "teacher.checkpoint={step}", "--steps", "4", "--out", "{root}/demo",
                       "model.img_size=32", "data.synthetic_size=40", "data.synthetic_images=16"], ["masking.gpa.head=11", "3 heads"]),
    "demo-range": (["demo", "--steps", "4", "masking.ratio=1.5"], ["masking.ratio"]),
    "config-show-type": (["config", "show", "optim.blr=abc"], ["optim.blr"]),
    "config-show-recipe": (["config", "show", "recipe=nosuch"], ["nosuch"]),
    "visualize-checkpoint-missing": (["visualize", "masks", "--checkpoint", "{missing}", *TINY], ["{missing}"]),
    "visualize-checkpoint-empty": (["visualize", "masks", "--checkpoint", "{empty}", *TINY], ["{empty}"]),
    "visualize-checkpoint-junk": (["visualize", "masks", "--checkpoint", "{junk}", *TINY], ["{junk}"]),
    "visualize-images-missing": (["visualize", "masks", "--images", "{missing}", *TINY], ["{missing}"]),
    "visualize-images-empty": (["visualize", "masks", "--images", "{empty}", *TINY], ["{empty}"]),
    "visualize-strategy": (["visualize", "masks", "--strategies", "bogus", *TINY], ["bogus"]),
    "visualize-range": (["visualize", "masks", *TINY, "masking.ratio=1.5"], ["masking.ratio"]),
    "select-head-checkpoint-missing": (["select-head", "--checkpoint", "{missing}", *TINY], ["{missing}"]),
    "select-head-checkpoint-junkstep": (["select-head", "--checkpoint", "{junkstep}", *TINY], ["{junkstep}"]),
    "select-head-model": (["select-head", "model.name=bogus"], ["model.name", "bogus"]),
    "bench-data-rows": (["bench", "data", "--rows", "bogus"], ["bogus"]),
    "shards-write-missing": (["shards", "write", "--imagefolder", "{missing}", "{root}/shards"], ["{missing}"]),
    "shards-write-empty": (["shards", "write", "--imagefolder", "{empty}", "{root}/shards"], ["{empty}"]),
    "shards-index-missing": (["shards", "index", "{missing}.tar", "--out", "{root}/index.json"], ["{missing}"]),
    "convert-missing": (["convert", "{missing}", "--out", "{root}/out"], ["{missing}"]),
    "convert-empty": (["convert", "{empty}", "--out", "{root}/out"], ["{empty}"]),
    "convert-junkstep": (["convert", "{junkstep}", "--out", "{root}/out"], ["{junkstep}"]),
    "convert-suffix": (["convert", "{run}/checkpoints/step_00000001", "--to", "timm", "--out", "{root}/x.txt"],
                       ["--out"]),
    "finetune-checkpoint-missing": (["finetune", "checkpoint={missing}", "data.dataset=cifar10", "data.root={empty}"],
                                    ["{missing}"]),
    "finetune-type": (["finetune", "optim.blr=abc"], ["optim.blr"]),
    "linprobe-root-empty": (["linprobe", "checkpoint={run}", "data.dataset=cifar10", "data.root={empty}",
                             "output.dir={root}/lp"], ["{empty}"]),
    "linprobe-checkpoint-junk": (["linprobe", "checkpoint={junk}", "data.dataset=cifar10", "data.root={empty}",
                                  "output.dir={root}/lp"], ["{junk}"]),
    "knn-checkpoint-empty": (["knn", "checkpoint={empty}", "data.dataset=cifar10", "data.root={empty}",
                              "output.dir={root}/knn"], ["{empty}"]),
    "knn-unknown-key": (["knn", "knn.bogus=1"], ["knn.bogus"]),
    "results-missing": (["results", "{missing}"], ["{missing}"]),
    "results-empty": (["results", "{empty}"], ["{empty}"]),
    "detect-checkpoint-missing": (["detect", "backbone.checkpoint={missing}", "data.root={empty}"], ["{missing}"]),
    "detect-root-empty": (["detect", "backbone.checkpoint={run}", "data.root={empty}", "output.dir={root}/det"],
                          ["{empty}"]),
    "segment-unknown-key": (["segment", "optim.bogus=1"], ["optim.bogus"]),
    "segment-checkpoint-junk": (["segment", "backbone.checkpoint={junk}", "backbone.name=mae_vit_tiny_patch16",
                                 "data.root={empty}", "output.dir={root}/seg"], ["{junk}"]),
    "analyze-attention-missing": (["analyze", "attention", "{missing}"], ["{missing}"]),
    "analyze-attention-empty": (["analyze", "attention", "{empty}"], ["{empty}"]),
    "analyze-attention-junk": (["analyze", "attention", "{junk}"], ["{junk}"]),
    "analyze-cka-truncated": (["analyze", "cka", "{truncated}"], ["{truncated}"]),
    "analyze-attention-images": (["analyze", "attention", "{run}", "--images", "{missing}", "--out", "{root}/a"],
                                 ["{missing}"]),
    "analyze-masks-range": (["analyze", "masks", *TINY, "masking.ratio=1.5"], ["masking.ratio"]),
    "analyze-masks-no-foreground": (["analyze", "masks", "--images", "{empty}", *TINY], ["--masks"]),
    "analyze-pimr-missing": (["analyze", "pimr", "{missing}"], ["{missing}"]),
    "analyze-pimr-empty": (["analyze", "pimr", "{empty}"], ["{empty}"]),
    "plot-missing": (["plot", "{missing}"], ["{missing}"]),
    "plot-empty": (["plot", "{empty}"], ["{empty}"]),
    "launch-unknown-key": (["launch", "--dry-run", "pretrain", "optim.bogus=1"], ["optim.bogus"]),
    "sweep-missing": (["sweep", "{missing}.yaml", "--dry-run"], ["{missing}.yaml"]),
    "sweep-variable": (["sweep", "standard", "novalue", "--dry-run"], ["novalue"]),
    "status-missing": (["status", "{missing}"], ["{missing}"]),
    "status-empty": (["status", "{empty}"], ["{empty}"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(case, bad, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MIMSCALE_CACHE", str(bad["root"] / "cache"))
    monkeypatch.chdir(tmp_path)  # default output folders land here
    argv, names = CASES[case]
    refuse(capsys, [a.format(**bad) for a in argv], *(n.format(**bad) for n in names))


def test_a_missing_extra_is_one_line_naming_how_to_install_it(bad, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # as if ffcv were not installed: imports fail
    refuse(capsys, ["pretrain", *TINY, "data.source=ffcv", f"data.urls={tmp_path / 'x.beton'}"],
           "needs the ffcv package", "pip install 'mimscale[ffcv]'", "libturbojpeg0-dev")
    refuse(capsys, ["shards", "write", "--synthetic", "8", str(tmp_path / "x.beton")], "needs the ffcv package")


def test_unknown_flags_stay_errors(capsys):
    for argv in (["pretrain", "recipe=mae", "--bogus"], ["config", "show", "--steps", "4"],
                 ["analyze", "masks", "masking.ratio=0.5", "--nope"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_debug_shows_the_traceback(capsys, monkeypatch):
    assert main(["--debug", "config", "show", "optim.blr=abc"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1].startswith("mimscale config: optim.blr: expected float")
    monkeypatch.setenv("MIMSCALE_DEBUG", "1")
    assert main(["config", "show", "optim.blr=abc"]) == 2
    assert "Traceback" in capsys.readouterr().err


def _cli(*argv, **env):
    return subprocess.run([sys.executable, "-m", "mimscale", *argv], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_the_real_command_exits_2_without_a_traceback(bad):
    proc = _cli("analyze", "attention", bad["missing"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert bad["missing"] in proc.stderr
    proc = _cli("pretrain", "optim.blr=abc", MIMSCALE_DEBUG="1")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "optim.blr" in proc.stderr
