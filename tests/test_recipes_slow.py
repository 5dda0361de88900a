"""A few hundred steps of four recipes on the synthetic data: the reconstruction loss falls."""

import pytest

from mimscale.cli import main
from mimscale.demo import loss_trend
from mimscale.pretrain.engine.logger import read_metrics

STEPS = 150


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["mae", "gpa", "ccmim", "sbam_amr"])
def test_reconstruction_loss_falls(recipe, tiny_overrides, tmp_path, capsys):
    teacher = []
    if recipe == "gpa":  # a briefly pretrained MAE is the frozen teacher
        assert main(["pretrain", *tiny_overrides, f"output.dir={tmp_path / 'teacher'}", "schedule.max_steps=30",
                     "data.synthetic_images=256", "optim.blr=2e-3", "schedule.warmup_steps=5"]) == 0
        teacher = [f"teacher.checkpoint={tmp_path / 'teacher' / 'checkpoints' / 'step_00000030'}",
                   "masking.gpa.head=0", "masking.gpa.block=-1"]
    run = tmp_path / "run"
    assert main(["pretrain", *tiny_overrides, f"recipe={recipe}", *teacher, f"output.dir={run}",
                 f"schedule.max_steps={STEPS}", "data.synthetic_images=256", "data.batch_size=16",
                 "optim.lr=1e-3", "schedule.warmup_steps=10", "logging.log_every=5",
                 "objectives.ccmim.dim=32"]) == 0
    records = read_metrics(run / "metrics.jsonl")
    assert records[-1]["step"] == STEPS
    first, last = loss_trend([(r["step"], r["loss_pixel"]) for r in records])
    rate = records[-1]["images_per_s"]
    with capsys.disabled():
        print(f"\n{recipe}: reconstruction loss {first:.3f} -> {last:.3f} over {STEPS} steps ({rate:.0f} images/s)")
    assert last < 0.9 * first, (recipe, first, last)
