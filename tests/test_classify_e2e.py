"""Each classification command end to end on the CPU, from a checkpoint pretrained here: on
CIFAR-format data written by the test (where the accuracy claims are checked) and on the
project's synthetic images; then ``mimscale results`` over every run."""

import argparse
import json
import os
import signal

import numpy as np
import pytest
import torch
from classify_data import CLASSES, ramps, write_cifar, write_imagefolder
from distributed_utils import one_thread  # noqa: F401  (autouse fixture)

from mimscale.cli import main
from mimscale.downstream.classify.config import DataConfig
from mimscale.downstream.classify.data import synthetic_root
from mimscale.downstream.classify.datasets import build_dataset
from mimscale.downstream.classify.subsets import draw_per_class, read_subset_file
from mimscale.downstream.results import read_results
from mimscale.pretrain.engine.logger import RunLogger, read_metrics
from mimscale.pretrain.models import build_mae

pytestmark = pytest.mark.slow
QUIET = ["data.num_workers=0", "engine.precision=fp32", "output.tensorboard=false", "output.progress=off"]


@pytest.fixture(scope="module")
def area(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIMSCALE_CACHE", str(root / "cache"))
        yield root


@pytest.fixture(scope="module")
def cifar(area):
    return write_cifar(area / "cifar", "cifar10", ramps(320, 1), ramps(160, 2), CLASSES).parent


@pytest.fixture(scope="module")
def pretrained(area):
    """300 MAE steps on 512 ramp images (about 20 s on two cores): enough for the encoder to
    organise the directions; the checkpoint is shared by every test here."""
    images = write_imagefolder(area / "pretrain_images", *ramps(512, 0))
    run = area / "pretrain"
    threads = torch.get_num_threads()
    assert main(["pretrain", "model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8",
                 "model.decoder_embed_dim=64", "model.decoder_depth=1", "model.decoder_num_heads=2",
                 "data.source=imagefolder", f"data.root={images}", "data.batch_size=32", "data.num_workers=0",
                 "optim.lr=3e-4", "optim.min_lr=2e-4", "schedule.max_steps=300", "schedule.warmup_steps=10",
                 "engine.precision=fp32", "engine.threads=1", "logging.log_every=100", "logging.image_every=0",
                 "logging.progress=off", "logging.tensorboard=false", "engine.memory_report_steps=0",
                 "output.checkpoint_every=300", f"output.dir={run}"]) == 0
    torch.set_num_threads(threads)  # engine.threads is process-wide
    return run / "checkpoints" / "step_00000300"


def _result(run_dir, name):
    return json.loads((run_dir / "results" / f"{name}.json").read_text())


def test_protocols_beat_chance_and_random_init_on_cifar_format_data(area, cifar, pretrained, capsys):
    runs = area / "runs"
    data = ["data.dataset=cifar10", f"data.root={cifar}", *QUIET]
    chance = 100 / len(CLASSES)

    # fine-tuning with MAE's recipe (mixup, cutmix, RandAugment, layer decay, bf16 autocast) but 30
    # steps, so a larger lr than MAE's 5e-4 x 1024 / 256 (measured: 81-93 % over seeds, 58 % at
    # blr 1e-3); no flips, which would swap two classes
    assert main(["finetune", f"checkpoint={pretrained}", *data, "engine.precision=bf16", "data.batch_size=32",
                 "augment.hflip=0", "optim.blr=6e-3", "schedule.max_steps=30", "schedule.warmup_epochs=0.5",
                 "eval.every=100", f"output.dir={runs / 'ft'}"]) == 0
    ft = _result(runs / "ft", "cifar10_finetune")
    assert ft["value"] > chance + 45, ft
    assert ft["checkpoint"] == "pretrain@300" and ft["recipe"] == "mae" and ft["metrics"]["n"] == 160
    assert ft["mask_ratio"] == 0.75  # the pretraining config's masking.ratio
    for variant in ("occlude50", "shuffle"):
        robust = _result(runs / "ft", f"cifar10_finetune+{variant}")
        assert 0 <= robust["value"] <= 100 and robust["config_hash"] == ft["config_hash"]

    # linear probe on cached features; few steps, so a larger lr than MAE's 0.1 x 16384 / 256
    assert main(["linprobe", f"checkpoint={pretrained}", *data, "cache_features=true", "data.batch_size=64",
                 "schedule.epochs=30", "schedule.warmup_epochs=2", "optim.blr=5", "eval.every=100",
                 f"output.dir={runs / 'lp'}"]) == 0
    assert _result(runs / "lp", "cifar10_linprobe")["value"] > chance + 45
    assert (runs / "lp" / "features" / "train.pt").is_file()

    # k-NN: the pretrained encoder against the same architecture at its initialisation
    assert main(["knn", f"checkpoint={pretrained}", *data, f"output.dir={runs / 'knn'}"]) == 0
    assert main(["knn", "model.name=mae_vit_tiny_patch16", "model.patch_size=8", "model.img_size=32", *data,
                 f"output.dir={runs / 'knn_random'}"]) == 0
    knn, random = _result(runs / "knn", "cifar10_knn"), _result(runs / "knn_random", "cifar10_knn")
    assert random["checkpoint"] == "random-init" and "mask_ratio" not in random
    assert knn["value"] > random["value"] + 25 and knn["value"] > chance + 45, (knn["value"], random["value"])

    capsys.readouterr()
    assert main(["results", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "| checkpoint | cifar10/finetune | cifar10/finetune+occlude50 | cifar10/finetune+shuffle | " \
           "cifar10/linprobe | cifar10/knn |" in out
    assert f"| pretrain@300 | {ft['value']:.2f} |" in out and "| random-init |" in out
    assert (runs / "results.csv").is_file()


def test_commands_on_synthetic_images(area, pretrained, monkeypatch):
    runs = area / "synthetic"
    data = ["data.dataset=synthetic", "data.synthetic_images=96", "data.synthetic_val_images=48", *QUIET]
    # fine-tune on a 25 % per-class draw, with EMA; then continue the run; then evaluate it as a classifier
    ft = runs / "ft"
    base = ["finetune", f"checkpoint={pretrained}", *data, "data.batch_size=8", "data.subset=0.25",
            "ema.enabled=true", "ema.decay=0.9", "eval.robustness=false", "output.log_every=1",
            f"output.dir={ft}"]
    # a preemption signal after step 1 (mid-epoch: 2 steps per epoch) checkpoints and stops the run
    log = RunLogger.log

    def log_then_signal(self, step, metrics):
        log(self, step, metrics)
        if step == 1 and "loss" in metrics:
            os.kill(os.getpid(), signal.SIGUSR2)

    monkeypatch.setattr(RunLogger, "log", log_then_signal)
    assert main([*base, "schedule.max_steps=4"]) == 0
    monkeypatch.undo()
    assert [p.name for p in (ft / "checkpoints").iterdir()] == ["step_00000001"]
    assert not (ft / "results").exists()
    train = build_dataset("synthetic", synthetic_root(DataConfig("synthetic", synthetic_images=96,
                                                                 synthetic_val_images=48)), "train")
    want = sum(max(1, round(0.25 * n)) for n in np.bincount(train.labels))
    subset = (ft / "subset.txt").read_text().splitlines()
    assert len(subset) == 1 + want and subset[0].startswith("# synthetic train: 0.25 per class, seed 0")
    assert main([*base, "schedule.max_steps=4", "resume=auto"]) == 0  # continues inside the epoch
    records = [r for r in read_metrics(ft / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["data_wait_ms"] >= 0 for r in records)
    straight = runs / "ft_straight"  # the same run, never stopped: the same weights
    assert main([*base[:-1], f"output.dir={straight}", "schedule.max_steps=4"]) == 0
    a, b = (torch.load(r / "checkpoints" / "step_00000004" / "state.pt", weights_only=True) for r in (ft, straight))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    first = _result(ft, "synthetic@25%_finetune")
    assert first["subset_size"] == want and _result(ft, "synthetic@25%_finetune+ema")["value"] >= 0
    ckpt = ft / "checkpoints" / "step_00000004"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["classifier"]["num_classes"] == 6 and "head.weight" in state["model"] and state["ema"]
    trained = _result(ft, "synthetic@25%_finetune")
    assert main(["finetune", f"checkpoint={ckpt}", *data, "eval_only=true", "eval.robustness=true",
                 f"output.dir={runs / 'eval'}"]) == 0
    again = _result(runs / "eval", "synthetic_finetune")
    # rows stay the pretrained checkpoint, with its pretraining mask ratio
    assert again["value"] == pytest.approx(trained["value"]) and again["checkpoint"] == "pretrain@300"
    assert again["mask_ratio"] == trained["mask_ratio"] == 0.75
    assert _result(runs / "eval", "synthetic_finetune+shuffle")["metrics"]["n"] == 48

    # a subset file gives the same draw back
    assert main(["finetune", f"checkpoint={pretrained}", *data, "data.batch_size=8",
                 f"data.subset_file={ft / 'subset.txt'}", "schedule.max_steps=1", "eval.robustness=false",
                 f"output.dir={runs / 'ft_file'}"]) == 0
    assert _result(runs / "ft_file", "synthetic@subset_finetune")["subset_size"] == want
    assert read_subset_file(ft / "subset.txt", train.keys) == draw_per_class(train.labels, 0.25, seed=0)
    copied = (runs / "ft_file" / "subset.txt").read_text().splitlines()  # the run keeps what it used
    assert copied[0].startswith(f"# synthetic train: from {ft / 'subset.txt'}, {want} of ") and copied[1:] == subset[1:]

    # linear probe through the frozen encoder with MAE's augmentation (no cached features), mean pool
    assert main(["linprobe", f"checkpoint={pretrained}", *data, "data.batch_size=16", "model.pool=mean",
                 "engine.precision=bf16",
                 "schedule.max_steps=3", f"output.dir={runs / 'lp'}"]) == 0
    lp = runs / "lp"
    assert _result(lp, "synthetic_linprobe")["features"] == "augmented"
    head_only = torch.load(lp / "checkpoints" / "step_00000003" / "state.pt", weights_only=True)["model"]
    assert sorted(head_only) == ["head.0.num_batches_tracked", "head.0.running_mean", "head.0.running_var",
                                 "head.1.bias", "head.1.weight"]  # the frozen encoder is not copied

    assert main(["knn", f"checkpoint={pretrained}", *data, "knn.k=5", "knn.chunk=7", "engine.precision=bf16",
                 f"output.dir={runs / 'knn'}"]) == 0
    knn = _result(runs / "knn", "synthetic_knn")
    assert knn["k"] == 5 and knn["metrics"]["n"] == 48 and 0 <= knn["value"] <= 100
    assert {r["benchmark"] for r in read_results(runs)} >= {"synthetic/knn", "synthetic/linprobe",
                                                            "synthetic@25%/finetune"}


def test_official_mae_file_and_the_linprobe_feature_cache(area, pretrained, monkeypatch):
    from mimscale.downstream.classify import linprobe

    runs = area / "mae_file"
    runs.mkdir()
    data = ["data.dataset=synthetic", "data.synthetic_images=96", "data.synthetic_val_images=48", *QUIET]
    # the pretrained weights as an official MAE file: {"model": official keys with decoder, "args": ...}
    mae_pth = runs / "mae_pretrain_tiny.pth"
    state = torch.load(pretrained / "state.pt", weights_only=True)["model"]
    torch.save({"model": state, "args": argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.6)}, mae_pth)
    # k-NN from the run folder (its newest checkpoint) and from the MAE file: the same encoder, the
    # same numbers; each result names its checkpoint and the mask ratio that checkpoint records
    assert main(["knn", f"checkpoint={area / 'pretrain'}", *data, f"output.dir={runs / 'knn_run'}"]) == 0
    assert main(["knn", f"checkpoint={mae_pth}", *data, f"output.dir={runs / 'knn_mae'}"]) == 0
    a, b = _result(runs / "knn_run", "synthetic_knn"), _result(runs / "knn_mae", "synthetic_knn")
    assert a["metrics"] == b["metrics"]
    assert (a["checkpoint"], a["mask_ratio"], b["checkpoint"], b["mask_ratio"]) == (
        "pretrain@300", 0.75, "mae_pretrain_tiny", 0.6)

    # cached linear-probe features: computed once, read back by the next run, recomputed when the
    # weights behind the same file name change
    calls = []
    extract = linprobe.extract
    monkeypatch.setattr(linprobe, "extract", lambda *args, **kw: calls.append(1) or extract(*args, **kw))
    lp = ["linprobe", f"checkpoint={mae_pth}", *data, "cache_features=true", "data.batch_size=16",
          "schedule.max_steps=6", f"output.dir={runs / 'lp'}"]
    assert main(lp) == 0 and len(calls) == 2  # the training and the evaluation split
    first = _result(runs / "lp", "synthetic_linprobe")
    assert main(lp) == 0 and len(calls) == 2  # nothing recomputed
    assert _result(runs / "lp", "synthetic_linprobe")["metrics"] == first["metrics"]
    torch.manual_seed(1)
    other = build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, decoder_depth=1).state_dict()
    torch.save({"model": other}, mae_pth)
    assert main(lp) == 0 and len(calls) == 4


def test_layout_errors_reach_the_user(area, pretrained, capsys):
    assert main(["knn", f"checkpoint={pretrained}", "data.dataset=cub200", f"data.root={area}", *QUIET,
                 f"output.dir={area / 'bad'}"]) == 2
    err = capsys.readouterr().err
    assert "cub200 at" in err and "'images.txt' is missing" in err and "image_class_labels.txt" in err
