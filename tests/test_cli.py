"""The command line itself: overrides anywhere among the flags, `config show` of an incomplete
config, and what `demo` says it runs."""

import pytest
import yaml

from mimscale.cli import build_parser, main
from mimscale.config import from_dict, load_config


@pytest.mark.parametrize("argv, flags", [
    (["demo", "{a}", "--steps", "4", "{b}", "--out", "o", "{c}"], {"steps": 4, "out": "o"}),
    (["demo", "--steps", "4", "{a}", "{b}", "{c}"], {"steps": 4}),
    (["pretrain", "{a}", "--print-config", "{b}", "{c}"], {"print_config": True}),
    (["config", "show", "{a}", "{b}", "{c}"], {}),
    (["select-head", "{a}", "--num-images", "3", "{b}", "--seed", "2", "{c}"], {"num_images": 3, "seed": 2}),
    (["analyze", "masks", "--out", "x", "{a}", "--seed", "1", "{b}", "--progress", "0.5", "{c}"],
     {"out": "x", "seed": 1, "progress": 0.5}),
    (["visualize", "masks", "{a}", "{b}", "--num", "2", "{c}"], {"num": 2}),
    (["linprobe", "{a}", "--print-config", "{b}", "--config", "c.yaml", "{c}"],
     {"print_config": True, "config": "c.yaml"}),
    (["segment", "{a}", "--synthetic", "8", "{b}", "{c}", "--print-config"], {"synthetic": 8, "print_config": True}),
])
def test_overrides_may_come_before_between_and_after_flags(argv, flags):
    items = {"a": "recipe=gpa", "b": "masking.ratio=0.6", "c": "teacher.checkpoint=X"}
    args = build_parser().parse_args([t.format(**items) for t in argv])
    assert args.overrides == list(items.values())  # in command-line order: later ones win
    assert {k: getattr(args, k) for k in flags} == flags


def test_sweep_variables_may_follow_flags():
    args = build_parser().parse_args(["sweep", "standard", "a=1", "--dry-run", "b=2"])
    assert args.variables == ["a=1", "b=2"] and args.dry_run


def test_config_show_marks_missing_values_that_a_run_needs(capsys):
    assert main(["config", "show", "recipe=mae"]) == 0
    out, err = capsys.readouterr()
    root = next(line for line in out.splitlines() if line.startswith("  root:"))
    assert root.startswith("  root: null  # required when data.source=imagefolder")
    assert "data.root" in err and "teacher.checkpoint" not in err
    assert from_dict(yaml.safe_load(out)) == load_config(["recipe=mae"], require=False)  # comments only

    assert main(["pretrain", "--print-config", "recipe=gpa", "model.name=mae_vit_tiny_patch16"]) == 0
    out, err = capsys.readouterr()
    teacher = next(line for line in out.splitlines() if line.startswith("teacher:"))
    assert "# checkpoint: required when teacher.type=frozen" in teacher
    assert "data.root" in err and "teacher.checkpoint" in err
    assert yaml.safe_load(out)["model"]["name"] == "mae_vit_tiny_patch16"

    assert main(["config", "show", "recipe=mae", "data.source=synthetic"]) == 0
    out, err = capsys.readouterr()
    assert "# required" not in out and err == ""


def test_a_run_still_refuses_a_missing_value(capsys):
    assert main(["pretrain", "recipe=gpa", "data.source=synthetic"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mimscale pretrain: teacher.checkpoint: required when teacher.type=frozen (a mimscale checkpoint "
        "folder or an official MAE .pth)")
    assert main(["pretrain", "recipe=mae"]) == 2
    assert "data.root: required when data.source=imagefolder" in capsys.readouterr().err


def test_demo_names_the_recipe_it_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIMSCALE_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "recipe=block", "--steps", "1", "--out", str(tmp_path / "demo"), "model.img_size=32",
                 "data.synthetic_size=40", "data.synthetic_images=16", "data.batch_size=8", "data.num_workers=0",
                 "logging.image_every=0", "logging.tensorboard=false"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("mimscale demo: 1 steps of block pretraining (recipe block, block masking, ")
    assert "MAE" not in first
