"""The dense backbone adapter: windowed attention, position tables, pyramids, layer decay, weights."""

import dense_support
import pytest
import torch
import torch.nn.functional as F

from mimscale.downstream.dense import (
    MultiLevelRescale,
    SimpleFeaturePyramid,
    ViTBackbone,
    build_backbone,
    default_global_blocks,
    depth_fractions_to_indices,
    layer_decay_param_groups,
    layer_id,
    load_backbone_weights,
    resize_pos_embed,
    window_partition,
    window_unpartition,
)
from mimscale.pretrain.models import build_mae, to_timm_state_dict

tiny_mae_checkpoint = dense_support.tiny_mae_checkpoint


def tiny(**kw):
    args = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2, pretrain_img_size=32, drop_path=0.0)
    return ViTBackbone(**{**args, **kw}).eval()


def test_window_partition_roundtrip_and_padding_mask():
    x = torch.randn(2, 5, 7, 3)
    windows, pad, shape = window_partition(x, 3)
    assert windows.shape == (2 * 2 * 3, 9, 3) and pad.shape == (12, 9)
    assert torch.equal(window_unpartition(windows, 3, shape, 2), x)
    assert int((~pad).sum()) == 2 * 5 * 7  # exactly the real tokens are unpadded
    assert bool((~pad).any(1).all())  # every window keeps a real token
    assert torch.equal(windows[pad], torch.zeros_like(windows[pad]))


def test_windowed_block_equals_attention_inside_each_window_alone():
    torch.manual_seed(0)
    b = tiny(window_size=3, global_blocks=[])
    blk = b.blocks[0]
    x = torch.randn(1, 5, 7, 32)
    out = b._block(0, x)
    # direct: every window's real tokens attend only among themselves, with no padding at all
    y = blk.norm1(x)
    attn = torch.zeros_like(y)
    for r in range(0, 5, 3):
        for c in range(0, 7, 3):
            tile = y[:, r:r + 3, c:c + 3]
            h, w = tile.shape[1:3]
            attn[:, r:r + 3, c:c + 3] = blk.attn(tile.reshape(1, h * w, 32)).reshape(1, h, w, 32)
    ref = x + attn
    ref = ref + blk.mlp(blk.norm2(ref))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_global_backbone_matches_the_mae_encoder_without_cls():
    torch.manual_seed(0)
    mae = build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, decoder_depth=1,
                    decoder_embed_dim=32, decoder_num_heads=2).eval()
    b = build_backbone("mae_vit_tiny_patch16", mae.state_dict(), patch_size=8, window_size=0,
                       drop_path=0.0).eval()
    images = torch.randn(2, 3, 32, 32)
    x = mae.patch_embed(images) + mae.pos_embed[:, 1:]
    for blk in mae.blocks:
        x = blk(x)
    ref = x.transpose(1, 2).reshape(2, 192, 4, 4)
    torch.testing.assert_close(b(images)[-1], ref, atol=1e-5, rtol=1e-5)


def test_resize_pos_embed_is_bicubic_on_the_grid_and_keeps_cls():
    pos = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(pos, (4, 4)) is pos
    out = resize_pos_embed(pos, (6, 10))
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 10), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 60, 8)
    torch.testing.assert_close(out[:, 1:], ref)
    assert torch.equal(out[:, :1], pos[:, :1])
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.randn(1, 1 + 12, 8), (4, 4))


def test_backbone_takes_larger_inputs_and_rejects_bad_sizes():
    b = tiny(window_size=2, global_blocks=[3], out_indices=[0, 1, 2, 3])
    feats = b(torch.randn(1, 3, 48, 40))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 6, 5)] * 4
    with pytest.raises(ValueError, match="multiple of the patch size"):
        b(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="out_indices"):
        tiny(out_indices=[4])


def test_drop_path_grows_linearly_and_global_blocks_default_to_quarters():
    b = ViTBackbone(patch_size=16, embed_dim=32, depth=12, num_heads=2, drop_path=0.11)
    rates = [blk.drop_path.drop_prob if hasattr(blk.drop_path, "drop_prob") else 0.0 for blk in b.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.11, 12))
    assert b.global_blocks == [2, 5, 8, 11] and default_global_blocks(24) == [5, 11, 17, 23]
    assert depth_fractions_to_indices(12) == [2, 5, 8, 11]
    assert depth_fractions_to_indices(24) == [5, 11, 17, 23]


@pytest.mark.parametrize("patch", [8, 16, 32])
def test_pyramids_give_strides_4_to_32_for_any_power_of_two_patch(patch):
    H, W = 128, 64
    last = torch.randn(2, 32, H // patch, W // patch)
    simple = SimpleFeaturePyramid(32, patch, out_channels=16)
    assert [tuple(o.shape) for o in simple([last])] == [(2, 16, H // s, W // s) for s in (4, 8, 16, 32)]
    multi = MultiLevelRescale(32, patch)
    assert [tuple(o.shape) for o in multi([last] * 4)] == [(2, 32, H // s, W // s) for s in (4, 8, 16, 32)]
    with pytest.raises(ValueError, match="power-of-two"):
        SimpleFeaturePyramid(32, 12)


def test_layer_decay_groups_against_the_formula():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Module()
            self.backbone.vit = tiny()
            self.head = torch.nn.Linear(4, 2)

    model = Model()
    L, decay, lr = 4, 0.7, 1e-3
    groups = layer_decay_param_groups(model, lr, 0.05, decay, L, backbone_prefix="backbone.vit.")
    seen = {}
    for g in groups:
        for name in g["names"]:
            seen[name] = g
    assert set(seen) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        local = name.removeprefix("backbone.vit.")
        depth = (0 if local.startswith(("patch_embed", "pos_embed")) else
                 int(local.split(".")[1]) + 1 if local.startswith("blocks.") else L + 1)
        assert layer_id(name, L, "backbone.vit.") == depth
        g = seen[name]
        assert g["lr_scale"] == pytest.approx(decay ** (L + 1 - depth))
        assert g["lr"] == pytest.approx(lr * decay ** (L + 1 - depth))
        no_decay = p.ndim == 1 or name.endswith("pos_embed")
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name


def test_weights_load_from_mae_timm_and_report_what_they_ignore(tmp_path):
    mae = build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, decoder_depth=1,
                    decoder_embed_dim=32, decoder_num_heads=2)
    path = tmp_path / "mae.pth"
    torch.save({"model": mae.state_dict(), "args": None}, path)
    b = ViTBackbone.from_name("mae_vit_tiny_patch16", patch_size=8, pretrain_img_size=64)
    ignored = load_backbone_weights(b, path)
    assert "cls_token" in ignored and "norm.weight" in ignored and "decoder_embed.weight" in ignored
    assert torch.equal(b.blocks[3].attn.qkv.weight, mae.blocks[3].attn.qkv.weight)
    torch.testing.assert_close(b.pos_embed, resize_pos_embed(mae.pos_embed, (8, 8)))  # 4x4 -> 8x8 grid
    timm_sd = to_timm_state_dict(mae)
    assert load_backbone_weights(b, timm_sd) == ["cls_token", "norm.bias", "norm.weight"]
    broken = {k: v for k, v in timm_sd.items() if k != "blocks.2.mlp.fc1.weight"}
    with pytest.raises(KeyError, match="blocks.2.mlp.fc1.weight"):
        load_backbone_weights(b, broken)
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone_weights(ViTBackbone.from_name("mae_vit_small_patch16", patch_size=8), timm_sd)


def test_build_backbone_reads_the_model_from_a_mimscale_checkpoint(tiny_mae_checkpoint):
    b = build_backbone("auto", tiny_mae_checkpoint, window_size=0)
    assert (b.patch_size, b.embed_dim, b.depth) == (8, 192, 12)
    assert b.pos_embed.shape == (1, 1 + 16, 192)  # the checkpoint's 4x4 grid, not resized twice
    with pytest.raises(ValueError, match="auto"):
        build_backbone("auto", None)

