"""`mimscale demo` and `mimscale pretrain` through the public CLI."""

import json

from mimscale.cli import main
from mimscale.demo import DEFAULT_STEPS, demo_config, loss_trend


def test_demo_defaults_are_cpu_sized(monkeypatch, tmp_path):
    monkeypatch.setenv("MIMSCALE_CACHE", str(tmp_path))
    cfg = demo_config()
    assert cfg.schedule.max_steps == DEFAULT_STEPS and cfg.model.name == "mae_vit_tiny_patch16"
    assert cfg.data.source == "synthetic" and cfg.output.dir.startswith("runs/demo/")


def test_demo_runs_a_few_steps(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MIMSCALE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    code = main(["demo", "--steps", "4", "--out", str(out), "data.synthetic_images=64", "data.num_workers=0",
                 "logging.log_every=2", "model.img_size=32", "data.synthetic_size=40"])
    assert code == 0
    text = capsys.readouterr().out
    assert "finished 4 steps" in text and "reconstruction loss:" in text
    for name in ("checkpoint", "metrics", "tensorboard", "figure"):
        assert f"  {name}" in text
    assert (out / "checkpoints" / "step_00000004" / "COMPLETE").exists()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    assert list((out / "figures").glob("*.png")) and (out / "config.yaml").exists()
    # generated once, then reused from the cache
    marker = next((tmp_path / "cache" / "synthetic").glob("*/train/.complete"))
    before = marker.stat().st_mtime_ns
    assert main(["demo", "--steps", "1", "--out", str(tmp_path / "again"), "data.synthetic_images=64",
                 "data.num_workers=0", "model.img_size=32", "data.synthetic_size=40"]) == 0
    assert marker.stat().st_mtime_ns == before


def test_pretrain_cli_and_resume(tiny_overrides, tmp_path, capsys):
    assert main(["pretrain", *tiny_overrides, "schedule.max_steps=2"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert main(["pretrain", *tiny_overrides, "schedule.max_steps=2", "resume=auto"]) == 0
    assert "resumed at step 2" in capsys.readouterr().out


def test_pretrain_cli_rejects_bad_config_before_work(tiny_overrides, tmp_path, capsys):
    assert main(["pretrain", *tiny_overrides, "masking.ratio=1.5"]) == 2
    assert "masking.ratio" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_loss_trend():
    assert loss_trend([(i, 10.0 - i) for i in range(10)]) == (9.5, 1.5)
    assert loss_trend([(1, 2.0)]) == (2.0, 2.0)
