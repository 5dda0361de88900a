"""Every shipped recipe trains end to end, tiny, on the CPU through the public CLI."""

import argparse
import math

import pytest
import torch

from mimscale.cli import main
from mimscale.config import available_recipes, load_config
from mimscale.pretrain.engine.checkpoint import load_checkpoint
from mimscale.pretrain.engine.logger import read_metrics
from mimscale.pretrain.models import build_mae

# what each recipe's checkpoint must hold beyond the student (method state keys, by prefix)
RECIPE_STATE = {
    "idm": ["strategy._extra_state"],
    "camae_plb": ["strategy._extra_state", "teacher.", "projector.", "predictor.", "momentum_projector."],
    "gpa": ["teacher.", "mam_head."],
    "gpa_teacher_only": ["teacher."],
    "gpa_2shot_guided": ["teacher.", "mam_head."],
    "ccmim": ["cc_projector."],
    "ccmim_align": ["cc_projector.", "cc_predictor."],
    "ccmim_code": ["cc_projector."],
}
# loss terms each recipe must log
RECIPE_TERMS = {
    "camae_plb": ["loss_contrast", "plb_p_0"], "gpa": ["loss_mam"], "gpa_2shot_guided": ["loss_mam", "loss_shot2"],
    "ccmim": ["loss_contrast"], "ccmim_align": ["loss_contrast"], "ccmim_code": ["loss_contrast"],
    "sbam_amr": ["mask_ratio", "salience_entropy"], "cmae_2shot": ["loss_shot2"], "cmae_3shot": ["loss_shot3"],
    "sbam_amr_2shot": ["loss_shot2", "mask_ratio"],
}


@pytest.fixture(scope="module")
def teacher_pth(tmp_path_factory):
    """A tiny MAE in the official checkpoint format, as GPA's frozen teacher."""
    model = build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, decoder_embed_dim=32, decoder_depth=1,
                      decoder_num_heads=2)
    path = tmp_path_factory.mktemp("teacher") / "mae_tiny.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace()}, path)
    return path


def tiny_recipe_overrides(recipe: str, teacher: str) -> list[str]:
    """What a CPU run of a ViT-B/L recipe changes: the model size (and what depends on it)."""
    extra = [f"recipe={recipe}"]
    if recipe.startswith("gpa"):
        extra += [f"teacher.checkpoint={teacher}", "masking.gpa.head=0", "masking.gpa.block=-1"]
    if recipe == "camae_plb" or recipe.startswith("ccmim"):
        extra += ["objectives.infonce.hidden=64", "objectives.ccmim.dim=32", "objectives.infonce.dim=32"]
    return extra


def test_every_recipe_is_covered():
    assert set(available_recipes()) >= {"mae", "block", "idm", "camae_plb", "gpa", "gpa_teacher_only", "ccmim",
                                        "ccmim_align", "ccmim_code", "sbam", "sbam_amr", "cmae_2shot", "cmae_3shot",
                                        "sbam_amr_2shot", "gpa_2shot_guided"}


@pytest.mark.parametrize("recipe", available_recipes())
def test_recipe_trains_tiny(recipe, tiny_overrides, teacher_pth, tmp_path):
    args = ["pretrain", *tiny_overrides, *tiny_recipe_overrides(recipe, teacher_pth), "schedule.max_steps=3",
            "data.batch_size=4"]
    assert main(args) == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 3
    for r in records:
        for k, v in r.items():
            if k.startswith("loss"):
                assert math.isfinite(v), (k, v)
    for term in RECIPE_TERMS.get(recipe, []):
        assert term in records[-1], (recipe, term, sorted(records[-1]))
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000003")
    for prefix in RECIPE_STATE.get(recipe, []):
        assert any(k.startswith(prefix) for k in state["method"]), (recipe, prefix, sorted(state["method"])[:5])
    assert "blocks.0.attn.qkv.weight" in state["model"]  # the student stays in the official layout


def test_recipe_defaults_follow_the_papers():
    cfg = load_config(["recipe=camae_plb", "data.source=synthetic"])
    assert (cfg.model.name, cfg.schedule.epochs, cfg.objectives.infonce.tau, cfg.teacher.momentum) == (
        "mae_vit_base_patch16", 400, 0.2, 0.99)
    assert (cfg.masking.idm.plb_lambda, cfg.masking.idm.plb_eps) == (0.99, 0.2)
    cfg = load_config(["recipe=gpa", "data.source=synthetic", "teacher.checkpoint=x.pth"])
    assert (cfg.masking.gpa.block, cfg.masking.gpa.head, cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (9, 11, 200, 20)
    assert cfg.masking.gpa.soft == (0.5, 0.0) and cfg.masking.gpa.hard == (0.0, 0.5) and cfg.objectives.mam.weight == 1
    cfg = load_config(["recipe=ccmim_code", "data.source=synthetic"])
    assert (cfg.objectives.ccmim.weight, cfg.objectives.ccmim.variant, cfg.masking.ccmim.importance,
            cfg.masking.selector, cfg.masking.noise_width) == (0.1, "code", "all_blocks", "noisy_topk", 1.0)
    cfg = load_config(["recipe=sbam_amr", "data.source=synthetic"])
    assert (cfg.model.name, cfg.masking.noise_width, cfg.masking.sbam.delta_r, cfg.masking.sbam.threshold) == (
        "mae_vit_large_patch16", 0.5, 0.15, 0.1)
    cfg = load_config(["recipe=cmae_3shot", "data.source=synthetic"])
    assert [(s.layer, s.ratio) for s in cfg.masking.shots] == [(0.8333, 0.1), (0.9167, 0.1)]
    with pytest.raises(Exception, match="teacher.checkpoint: required"):
        load_config(["recipe=gpa", "data.source=synthetic"])
