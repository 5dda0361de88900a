"""The analytic step FLOPs against torch's FlopCounterMode on a real training step of every recipe."""

import pytest
import torch
from test_recipes import teacher_pth, tiny_recipe_overrides  # noqa: F401  (teacher_pth: fixture)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mimscale.config import available_recipes
from mimscale.pretrain.engine.flops import peak_tflops, step_flops
from mimscale.pretrain.engine.logger import read_metrics
from mimscale.pretrain.engine.trainer import Trainer
from mimscale.pretrain.masking.functional import num_visible
from mimscale.pretrain.method import MIMMethod

BATCH = 4
# code paths no shipped recipe takes: (recipe, overrides)
VARIANTS = [
    ("gpa", ["objectives.mam.head=decoder", "masking.gpa.queries=all"]),
    ("ccmim", ["masking.ccmim.importance=all_blocks"]),
    ("idm", ["teacher.type=ema", "masking.score_source=teacher"]),
    ("mae", ["masking.shots=[{layer: 6, ratio: 0.5, guide: cls}]"]),
]
CASES = [(r, []) for r in available_recipes()] + VARIANTS


def measured_step(cfg) -> tuple[float, torch.Tensor]:
    """FLOPs FlopCounterMode counts in one forward + backward of the method (the trainer's micro-step),
    and the input mask. The math attention kernel: the CPU's fused one is invisible to the counter."""
    torch.manual_seed(0)
    method = MIMMethod(cfg).train()
    size = cfg.model.img_size
    images = torch.randn(BATCH, 3, size, size)
    views = torch.randn(BATCH, 3, size, size) if cfg.data.views == "mocov3" else None
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = method(images, torch.Generator().manual_seed(0), views)
        out.loss.backward()
    return counter.get_total_flops(), out.mae.shot_masks[0]


@pytest.mark.parametrize(("recipe", "overrides"), CASES, ids=[" ".join([r, *o]) for r, o in CASES])
def test_counted_flops_match_the_flop_counter(recipe, overrides, tiny_config, teacher_pth):  # noqa: F811
    cfg = tiny_config(*tiny_recipe_overrides(recipe, teacher_pth), f"data.batch_size={BATCH}", *overrides)
    measured, mask = measured_step(cfg)
    widths = (~mask).sum(dim=1)
    n = mask.shape[1]
    if cfg.masking.strategy == "sbam_amr":  # ragged: count the padded width the encoder ran
        counted = step_flops(cfg, visible=int(widths.max()))
    else:  # the plan's own count is the one the step ran
        assert widths.tolist() == [num_visible(n, cfg.masking.ratio)] * BATCH
        counted = step_flops(cfg)
    assert counted.per_step == pytest.approx(measured, rel=0.02), counted.table()
    assert counted.per_step == counted.per_image * BATCH


def test_parts_follow_the_plan(tiny_config):
    """A later shot, a scoring pass and a teacher each add their part; a lower ratio costs more."""
    mae = step_flops(tiny_config())
    assert set(mae.parts) == {"encoder", "decoder"}
    two_shot = step_flops(tiny_config("recipe=cmae_2shot"))
    assert two_shot.parts["encoder"].forward < mae.parts["encoder"].forward
    guided = step_flops(tiny_config("masking.shots=[{layer: 6, ratio: 0.5, guide: cls}]"))
    assert guided.parts["shot_guides"].backward == 0 < guided.parts["shot_guides"].forward
    idm = step_flops(tiny_config("recipe=idm"))
    assert idm.parts["scoring"].backward == 0 < idm.parts["scoring"].forward
    assert step_flops(tiny_config("masking.ratio=0.5")).per_image > mae.per_image
    assert step_flops(tiny_config("data.batch_size=16")).per_step == 2 * mae.per_step


def test_peak_table():
    assert peak_tflops("cpu", "bf16") is None
    assert peak_tflops("cpu", "fp32", override=12.5) == 12.5


@pytest.mark.parametrize("peak", [None, 0.5])
def test_training_logs_tflops_and_mfu(peak, tiny_config, capsys):
    cfg = tiny_config("schedule.max_steps=3", "optim.accum_steps=2", "data.batch_size=4",
                      *([f"engine.peak_tflops={peak}"] if peak else []))
    summary = Trainer(cfg).fit()
    records = read_metrics(summary.metrics)
    flops_per_step = step_flops(cfg).per_step  # one optimizer step: 2 micro-steps of 4 images
    for r in records:
        steps_per_s = r["images_per_s"] / (4 * 2)
        assert r["tflops_per_s"] == pytest.approx(flops_per_step * steps_per_s / 1e12, rel=1e-9)
        assert r["tflops_per_s"] > 0
        if peak:
            assert r["mfu"] == pytest.approx(r["tflops_per_s"] / peak, rel=1e-9)
        else:
            assert r["mfu"] is None  # a CPU has no known peak
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 3 and all("tflops_per_s=" in line for line in lines)
    assert all(("mfu=" in line) == bool(peak) for line in lines)
