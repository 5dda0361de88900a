"""Every masking strategy trains through the public CLI; strategy state survives a resume."""

import shutil

import pytest
import torch

from mimscale.cli import main
from mimscale.pretrain.engine.checkpoint import load_checkpoint
from mimscale.pretrain.engine.logger import read_metrics
from mimscale.pretrain.engine.trainer import Trainer

STRATEGY_RUNS = {
    "block": ["masking.strategy=block"],
    "idm": ["masking.strategy=idm"],
    "gpa_ema": ["masking.strategy=gpa", "teacher.type=ema", "masking.gpa.block=-1", "masking.gpa.head=mean"],
    "ccmim": ["masking.strategy=ccmim"],
    "sbam_amr": ["masking.strategy=sbam_amr"],
    "two_shot": ["masking.shots=[{layer: 10, ratio: 0.5, guide: cls}]", "masking.loss_weights=equal"],
}


@pytest.mark.parametrize("name", list(STRATEGY_RUNS))
def test_strategy_trains_through_cli(name, tiny_overrides, tmp_path):
    assert main(["pretrain", *tiny_overrides, "schedule.max_steps=2", "engine.precision=bf16",
                 *STRATEGY_RUNS[name]]) == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002")
    if name == "gpa_ema":
        assert any(k.startswith("teacher.blocks.") for k in state["method"])
    if name == "idm":
        assert "strategy._extra_state" in state["method"] and "plb_p_0" in records[-1]
    if name == "sbam_amr":
        assert 0.6 <= records[-1]["mask_ratio"] <= 0.9
    if name == "two_shot":
        assert "loss_shot2" in records[-1]


def test_plb_and_ema_state_resume_exactly(tiny_config, tmp_path):
    """IDM+PLB with an EMA teacher: resuming after the epoch boundary (6 steps/epoch) reproduces
    the uninterrupted run's losses, PLB distribution and teacher."""
    extra = ["masking.strategy=idm", "teacher.type=ema", "masking.score_source=teacher", "schedule.max_steps=9",
             "output.checkpoint_every=7", "output.keep_last=null", "schedule.warmup_steps=1"]
    full = Trainer(tiny_config(*extra)).fit()
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full.run_dir / "checkpoints" / "step_00000007", resumed_dir / "checkpoints" / "step_00000007")
    second = Trainer(tiny_config(*extra, f"output.dir={resumed_dir}", "resume=auto")).fit()
    want = dict(full.losses)
    for step, loss in second.losses:
        assert loss == pytest.approx(want[step], abs=1e-6)
    a, b = load_checkpoint(full.checkpoint)["method"], load_checkpoint(second.checkpoint)["method"]
    assert not torch.allclose(a["strategy._extra_state"]["p"], torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(a["strategy._extra_state"]["p"], b["strategy._extra_state"]["p"])
    for k in a:
        if k.startswith("teacher."):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
