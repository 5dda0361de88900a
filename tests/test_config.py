"""Config tree: recipes, overrides, and errors that name the key and what is valid."""

import pytest
import yaml

from mimscale.cli import main
from mimscale.config import (
    Config,
    ConfigError,
    available_recipes,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
)


def test_mae_recipe_defaults():
    cfg = load_config(["data.root=/data/in1k"])
    assert cfg.recipe == "mae"
    assert cfg.model.name == "mae_vit_large_patch16"
    assert cfg.masking.ratio == 0.75 and cfg.optim.blr == 1.5e-4
    assert cfg.optim.betas == (0.9, 0.95) and cfg.schedule.epochs == 800
    assert "mae" in available_recipes()


def test_overrides_are_typed():
    cfg = load_config(["data.source=synthetic", "optim.blr=1e-3", "data.batch_size=8", "data.hflip=false",
                       "data.crop_scale=[0.5, 1]", "optim.clip_grad=3", "optim.lr=null", "model.name=mae_vit_tiny_patch16"])
    assert cfg.optim.blr == 1e-3 and isinstance(cfg.optim.blr, float)
    assert cfg.data.batch_size == 8 and cfg.data.hflip is False
    assert cfg.data.crop_scale == (0.5, 1.0) and cfg.optim.clip_grad == 3.0 and cfg.optim.lr is None


def test_parse_overrides_nests_keys():
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": [1, 2]}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["model.name"])


@pytest.mark.parametrize("override, expected", [
    ("model.nme=x", r"unknown key 'model.nme' \(did you mean 'name'\?\); valid keys in model: name, img_size"),
    ("optimizer.blr=1", r"unknown key 'optimizer'.*valid keys in the config root: recipe, resume, model, data"),
    ("masking.ratio=1.0", r"masking.ratio: 1.0 is out of range; it must be >= 0 and < 1"),
    ("masking.gpa.head=max", r"masking.gpa.head: .max. is not valid"),
    ("masking.strategy=gpa", r"scores with a teacher but teacher.type=none"),
    ("teacher.type=frozen", r"teacher.checkpoint: required"),
    ("masking.shots=[{layer: 0, ratio: 0.1}]", r"masking.shots\[0\].layer: 0 must be"),
    ("masking.shots=[{layer: 5}, {layer: 3}]", r"must be strictly increasing"),
    ("masking.shots=[{layr: 5}]", r"unknown key .masking.shots\[0\].layr."),
    ("masking.ratio=0", r"masking.ratio: 0 hides nothing"),
    ("data.batch_size=0", r"data.batch_size: 0 is out of range; it must be > 0"),
    ("data.batch_size=abc", r"data.batch_size: expected int, got 'abc'"),
    ("data.batch_size=2.5", r"data.batch_size: expected int"),
    ("data.hflip=3", r"data.hflip: expected bool"),
    ("engine.precision=fp8", r"engine.precision: 'fp8' is not a valid choice; valid: bf16, fp32"),
    ("masking.strategy=magic", r"masking.strategy: .magic. is not a valid choice; valid: random, block, idm"),
    ("model.name=vit_giant", r"model.name: unknown model 'vit_giant'; valid: .*mae_vit_tiny_patch16"),
    ("data.crop_scale=[0.2]", r"data.crop_scale: expected a list of 2 values"),
    ("data.crop_scale=[0.9, 0.2]", r"data.crop_scale: .* must satisfy 0 < min <= max <= 1"),
    ("model.img_size=100", r"model.img_size: 100 is not a multiple of the patch size 16"),
    ("recipe=nope", r"recipe: unknown recipe 'nope'; valid: .*mae"),
    ("model=3", r"model: expected a mapping of keys"),
])
def test_bad_config_names_key_and_valid_values(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(["data.root=/data", override])


def test_imagefolder_needs_a_root():
    with pytest.raises(ConfigError, match="data.root: required when data.source=imagefolder"):
        load_config([])


def test_recipe_file_with_base(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: mae\nmasking: {ratio: 0.6}\ndata: {source: synthetic}\n")
    cfg = load_config([f"recipe={path}", "optim.blr=2e-4"])
    assert cfg.masking.ratio == 0.6 and cfg.model.name == "mae_vit_large_patch16" and cfg.optim.blr == 2e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: mae\nmasking: {ratoi: 0.6}\n")
    with pytest.raises(ConfigError, match="unknown key 'masking.ratoi'"):
        load_config([f"recipe={bad}"])


def test_dict_round_trip():
    cfg = load_config(["data.source=synthetic", "masking.ratio=0.6"])
    again = from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg and isinstance(again, Config)


def test_cli_config_show(capsys):
    assert main(["config", "show", "recipe=mae", "data.source=synthetic", "masking.ratio=0.6"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["masking"]["ratio"] == 0.6 and shown["model"]["name"] == "mae_vit_large_patch16"


def test_cli_reports_config_error(capsys):
    assert main(["config", "show", "data.source=synthetic", "masking.ratio=2"]) == 2
    assert "masking.ratio: 2.0 is out of range" in capsys.readouterr().err
