"""Packed ragged batches (``models.packed``, ``engine.varlen``): the encoder on the visible tokens of
all images concatenated, attention per image, must equal running each image alone."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from mimscale.config import ConfigError, load_config
from mimscale.pretrain.engine.flops import packed_step_flops, step_flops
from mimscale.pretrain.masking.multishot import ShotPlan
from mimscale.pretrain.method import build_model
from mimscale.pretrain.models import build_mae
from mimscale.pretrain.models.packed import Segments, drop_path

COUNTS = [5, 1, 9, 12]  # one image keeps a single visible token


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # nested tensors and eager FlexAttention warn once that they are new
        warnings.simplefilter("ignore", UserWarning)
        yield


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2)
    return build_mae("mae_vit_tiny_patch16", **{**args, **kw})


def ragged_mask(counts, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(len(counts), n, dtype=torch.bool)
    for b, c in enumerate(counts):
        mask[b, torch.randperm(n, generator=g)[:c]] = False
    return mask


def alone(model, images, mask, **kw):
    model.varlen = "padded"
    return [model(images[b:b + 1], mask[b:b + 1], **kw) for b in range(len(images))]


@pytest.mark.parametrize("kernel", ["nested", "flex", "masked"])
def test_packed_equals_each_image_alone(kernel):
    model = tiny()
    images, mask = torch.randn(4, 3, 32, 32), ragged_mask(COUNTS)
    model.varlen = kernel
    with torch.no_grad():  # FlexAttention has no backward on a CPU
        out = model(images, mask)
    assert out.latent.shape == (4, 1 + max(COUNTS), 48)
    with torch.no_grad():
        refs = alone(model, images, mask)
    torch.testing.assert_close(out.pred, torch.cat([r.pred for r in refs]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss_per_image, torch.cat([r.loss_per_image for r in refs]), rtol=0, atol=1e-5)
    for b, r in enumerate(refs):  # latent slots up to the image's count; zeros past it
        torch.testing.assert_close(out.latent[b, :1 + COUNTS[b]], r.latent[0], rtol=0, atol=1e-5)
        assert not out.latent[b, 1 + COUNTS[b]:].any()


# FlexAttention has no backward on a CPU; the CUDA cases are collected where CUDA exists
TRAINING_KERNELS = [("cpu", "nested"), ("cpu", "masked")] + (
    [("cuda", "nested"), ("cuda", "flex"), ("cuda", "masked")] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device,kernel", TRAINING_KERNELS)
def test_packed_forward_and_backward_equal_each_image_alone(device, kernel, monkeypatch):
    """Forward and backward in fp32 (on a GPU with TF32 off, torch's default for matmuls, so only
    summation order differs)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = tiny().to(device)
    images, mask = torch.randn(4, 3, 32, 32, device=device), ragged_mask(COUNTS).to(device)
    model.varlen = kernel
    out = model(images, mask)
    out.loss_per_image.sum().backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    refs = alone(model, images, mask)
    sum(r.loss_per_image.sum() for r in refs).backward()
    torch.testing.assert_close(out.pred, torch.cat([r.pred for r in refs]), rtol=0, atol=1e-4)
    for k, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(packed[k], p.grad, rtol=1e-3, atol=1e-4, msg=k)


def test_packed_gradients_equal_the_sum_over_images():
    model = tiny()
    images, mask = torch.randn(4, 3, 32, 32), ragged_mask(COUNTS, seed=1)
    model.varlen = "nested"
    model(images, mask).loss_per_image.sum().backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for r in alone(model, images, mask):
        r.loss_per_image.sum().backward()
    summed = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert packed.keys() == summed.keys() and "blocks.0.attn.qkv.weight" in packed
    for k in packed:
        torch.testing.assert_close(packed[k], summed[k], rtol=1e-4, atol=1e-5, msg=k)


def test_batch_of_one_and_a_single_visible_token():
    model = tiny()
    images, mask = torch.randn(1, 3, 32, 32), ragged_mask([1])
    model.varlen = "padded"
    ref = model(images, mask)
    model.varlen = "nested"
    out = model(images, mask)
    torch.testing.assert_close(out.pred, ref.pred, rtol=0, atol=1e-5)
    assert out.latent.shape == (1, 2, 48)


@pytest.mark.parametrize("kernel", ["nested", "masked"])
def test_packed_bf16_within_tolerance(kernel):
    """bf16 autocast: packed and per-image runs round differently (other kernels, other sums); the
    stated tolerance is 0.05 absolute on predictions of unit scale."""
    model = tiny()
    images, mask = torch.randn(4, 3, 32, 32), ragged_mask(COUNTS, seed=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.varlen = kernel
        out = model(images, mask)
        refs = alone(model, images, mask)
    ref = torch.cat([r.pred for r in refs]).float()
    assert (out.pred.float() - ref).abs().max() < 0.05
    assert torch.allclose(out.loss_per_image, torch.cat([r.loss_per_image for r in refs]), rtol=0.02)


@pytest.mark.parametrize("kernel", ["nested", "masked"])
@pytest.mark.parametrize("guide", ["random", "gpa"])
def test_packed_shots_equal_the_padded_path(guide, kernel):
    """A later shot on ragged images: packed and padded choose the same tokens and give the same
    output (a random shot draws over the batch's slots, identical in both layouts)."""
    model = tiny(depth=4)
    plan = ShotPlan([argparse.Namespace(layer=2, ratio=0.5, guide=guide)], depth=4)
    images, mask = torch.randn(4, 3, 32, 32), ragged_mask(COUNTS, seed=3)
    model.varlen = "padded"
    ref = model(images, mask, plan, torch.Generator().manual_seed(5))
    model.varlen = kernel
    out = model(images, mask, plan, torch.Generator().manual_seed(5))
    assert torch.equal(out.mask, ref.mask) and len(out.shot_masks) == 2
    assert (~out.mask).sum(1).tolist() == [c // 2 for c in COUNTS]
    torch.testing.assert_close(out.pred, ref.pred, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel", ["nested", "masked"])
@pytest.mark.parametrize("counts", [[1, 1, 1], [0, 0, 0]])
def test_a_shot_that_keeps_no_patch_and_a_mask_that_shows_none(counts, kernel):
    """Edge cases of the packed layout: a shot keeps floor(1 · 0.9) = 0 patches of each image, and a
    mask that hides every patch leaves the CLS token alone from the start."""
    model = tiny(depth=4)
    plan = ShotPlan([argparse.Namespace(layer=2, ratio=0.1, guide="random")], depth=4)
    images, mask = torch.randn(3, 3, 32, 32), ragged_mask(counts, seed=2)
    model.varlen = "padded"
    ref = model(images, mask, plan, torch.Generator().manual_seed(0))
    model.varlen = kernel
    out = model(images, mask, plan, torch.Generator().manual_seed(0))
    assert out.mask.all() and torch.equal(out.mask, ref.mask)
    torch.testing.assert_close(out.pred, ref.pred, rtol=0, atol=1e-5)


def test_packed_uniform_counts_with_a_shot_reads_nothing_from_the_mask():
    """Equal counts (a fixed ratio, ``visible`` known) through a shot: same result as padded."""
    model = tiny(depth=4)
    plan = ShotPlan([argparse.Namespace(layer=1, ratio=0.25, guide="random")], depth=4)
    images, mask = torch.randn(3, 3, 32, 32), ragged_mask([8, 8, 8], seed=4)
    model.varlen = "padded"
    ref = model(images, mask, plan, torch.Generator().manual_seed(1), visible=8)
    model.varlen = "nested"
    out = model(images, mask, plan, torch.Generator().manual_seed(1), visible=8)
    assert torch.equal(out.mask, ref.mask)
    torch.testing.assert_close(out.pred, ref.pred, rtol=0, atol=1e-5)


def test_state_dict_keys_do_not_depend_on_varlen():
    model = tiny()
    keys = list(model.state_dict())
    model.varlen = "nested"
    assert list(model.state_dict()) == keys


def test_drop_path_is_per_image_on_packed_rows():
    seg = Segments.of([3, 5, 2, 4, 6, 1], torch.tensor([3, 5, 2, 4, 6, 1]))
    torch.manual_seed(0)
    y = drop_path(torch.ones(seg.total, 4), 0.5, seg, training=True)
    for rows in y.split(seg.lengths):
        assert rows.unique().numel() == 1  # one factor (0 or 2) per image
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(drop_path(torch.ones(2, 4), 0.5, seg, training=False), torch.ones(2, 4))


def test_config_varlen_choices_and_auto():
    tiny_cpu = ["model.name=mae_vit_tiny_patch16", "model.img_size=32", "data.source=synthetic", "engine.device=cpu"]
    model = build_model(load_config(tiny_cpu))  # compile=auto: not compiled on a CPU, so auto stays per device
    assert model.varlen == "auto" and model._packs(torch.zeros(1, device="cpu"), None, None)  # masked
    compiled = load_config(["model.name=mae_vit_tiny_patch16", "model.img_size=32", "data.source=synthetic",
                         "engine.compile=true"])
    assert build_model(compiled).varlen == "padded"
    with pytest.raises(ConfigError, match="varlen"):
        load_config(["data.source=synthetic", "engine.varlen=ragged"])


def test_packed_flops_are_the_mean_over_images():
    cfg = load_config(["recipe=sbam_amr", "model.name=mae_vit_small_patch16", "data.source=synthetic"])
    assert packed_step_flops(cfg, [49] * 4).per_step == step_flops(cfg).per_step
    mixed = packed_step_flops(cfg, [30, 70])
    want = (step_flops(cfg, 30).per_step + step_flops(cfg, 70).per_step) / 2
    assert mixed.per_step == pytest.approx(want, rel=1e-12)
    assert mixed.per_step != step_flops(cfg, 50).per_step  # attention is quadratic in the count
    with pytest.raises(ValueError):
        packed_step_flops(cfg, [])

