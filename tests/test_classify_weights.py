"""Encoder weights of every accepted kind load into timm's ViT classifier unchanged."""

import argparse

import pytest
import torch
from safetensors.torch import save_file

from mimscale.downstream.classify.model import build_vit, load_weights
from mimscale.downstream.classify.weights import read_weights
from mimscale.errors import CheckpointError
from mimscale.pretrain.models import build_mae, to_timm_state_dict


@pytest.fixture(scope="module")
def mae():
    torch.manual_seed(0)
    model = build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, decoder_embed_dim=32, decoder_depth=1,
                      decoder_num_heads=2).eval()
    with torch.no_grad():  # make the final norm non-trivial, so dropping or keeping it shows
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
    return model


def _cls_features(vit, x):
    return vit.forward_head(vit.forward_features(x), pre_logits=True)


def test_official_mae_checkpoint_loads_as_is(tmp_path, mae):
    path = tmp_path / "mae_pretrain_full.pth"  # official layout: {'model': ..., 'args': Namespace}
    torch.save({"model": mae.state_dict(), "args": argparse.Namespace(model="mae_vit_tiny"), "epoch": 3}, path)
    w = read_weights(path)
    assert w.kind == "mae" and w.label == "mae_pretrain_full" and not w.has_head
    assert not any(k.startswith("decoder_") or k == "mask_token" for k in w.state)
    assert w.architecture() == ("mae_vit_tiny_patch16", 8) and w.pretrain_img_size() == 32
    vit = build_vit("mae_vit_tiny_patch16", 8, 32, 0, pool="cls", fc_norm=False).eval()
    assert load_weights(vit, w) == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = mae.encode(x, torch.zeros(2, 16, dtype=torch.bool)).latent[:, 0]
        torch.testing.assert_close(_cls_features(vit, x), want, rtol=1e-4, atol=1e-5)
    enc_only = tmp_path / "mae_pretrain_encoder.pth"
    torch.save({"model": to_timm_state_dict(mae)}, enc_only)
    assert read_weights(enc_only).kind == "mae"


def test_timm_state_dicts_and_finetune_heads(tmp_path, mae):
    save_file(to_timm_state_dict(mae), str(tmp_path / "vit.safetensors"))
    torch.save(to_timm_state_dict(mae), tmp_path / "vit.pth")
    for name in ("vit.safetensors", "vit.pth"):
        w = read_weights(tmp_path / name)
        assert w.kind == "timm" and w.architecture() == ("mae_vit_tiny_patch16", 8)
    # MAE fine-tuning: mean pool, the pretrained final norm is dropped and fc_norm starts fresh [C]
    vit = build_vit("mae_vit_tiny_patch16", 8, 32, 7, pool="mean")
    fresh = load_weights(vit, w)
    assert sorted(fresh) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    torch.testing.assert_close(vit.blocks[3].attn.qkv.weight, mae.blocks[3].attn.qkv.weight)
    assert torch.equal(vit.fc_norm.weight, torch.ones(192))
    # a fine-tuned classifier (fc_norm + head, as MAE's fine-tuned files) loads with its head
    state = vit.state_dict()
    torch.save({"model": state}, tmp_path / "mae_finetuned.pth")
    w2 = read_weights(tmp_path / "mae_finetuned.pth")
    assert w2.has_head
    again = build_vit("mae_vit_tiny_patch16", 8, 32, 7, pool="mean")
    assert load_weights(again, w2, with_head=True) == []
    assert torch.equal(again.head.weight, vit.head.weight)
    # a model with a final norm takes the classifier's fc_norm as its norm
    feats = build_vit("mae_vit_tiny_patch16", 8, 32, 0, pool="cls", fc_norm=False)
    load_weights(feats, w2)
    assert torch.equal(feats.norm.weight, vit.fc_norm.weight)


def test_position_table_resampled_and_mismatches_named(tmp_path, mae):
    torch.save(to_timm_state_dict(mae), tmp_path / "vit.pth")
    w = read_weights(tmp_path / "vit.pth")
    bigger = build_vit("mae_vit_tiny_patch16", 8, 48, 3, pool="mean")
    load_weights(bigger, w)
    assert bigger.pos_embed.shape == (1, 37, 192)
    torch.testing.assert_close(bigger.pos_embed[0, 0], w.state["pos_embed"][0, 0])  # CLS row kept
    small = build_vit("mae_vit_small_patch16", 8, 32, 3)
    with pytest.raises(ValueError, match="other shapes than the model"):
        load_weights(small, w)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_weights(tmp_path / "missing.pth")
