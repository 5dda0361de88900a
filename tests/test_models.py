"""Tests for mimscale.pretrain.models: MAE with an explicit mask vs. the official MAE recipe."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from mimscale.errors import CheckpointError
from mimscale.pretrain.models import (
    MAEOutput,
    MaskedAutoencoderViT,
    available_models,
    build_mae,
    load_mae_checkpoint,
    to_timm_state_dict,
)
from mimscale.pretrain.models.vit import Attention, Block, get_2d_sincos_pos_embed


def small_mae(**kw) -> MaskedAutoencoderViT:
    args = {"img_size": 32, "depth": 2, "decoder_embed_dim": 64, "decoder_depth": 2,
            "decoder_num_heads": 4}
    return build_mae("mae_vit_tiny_patch16", **{**args, **kw})


# ------------------------------------------------------------- direct reference of official MAE
def ref_block(blk, x):
    """Pre-norm block written out with an explicit softmax attention."""
    B, T, D = x.shape
    h = blk.attn.num_heads
    qkv = blk.attn.qkv(blk.norm1(x)).reshape(B, T, 3, h, D // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = (q @ k.transpose(-2, -1) * (D // h) ** -0.5).softmax(dim=-1)
    x = x + blk.attn.proj((a @ v).transpose(1, 2).reshape(B, T, D))
    return x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))


def ref_mae_forward(model, imgs, noise, mask_ratio):
    """Official MAE forward: random_masking by noise, shuffled encoder, unshuffle in decoder."""
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:, :]
    B, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(B, L)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (model.cls_token + model.pos_embed[:, :1, :]).expand(B, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in model.blocks:
        x = ref_block(blk, x)
    x = model.norm(x)

    x = model.decoder_embed(x)
    mask_tokens = model.mask_token.repeat(B, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        x = ref_block(blk, x)
    pred = model.decoder_pred(model.decoder_norm(x))[:, 1:, :]

    p = model.patch_size
    h = w = imgs.shape[2] // p
    target = imgs.reshape(B, 3, h, p, w, p)
    target = torch.einsum("nchpwq->nhwpqc", target).reshape(B, h * w, p * p * 3)
    if model.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    loss = (loss * mask).sum() / mask.sum()
    return loss, pred, mask


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("ratio", [0.75, 0.9])
def test_loss_matches_official_reference(norm_pix, ratio):
    torch.manual_seed(0)
    model = small_mae(img_size=64, norm_pix_loss=norm_pix).eval()
    imgs = torch.randn(3, 3, 64, 64)
    noise = torch.rand(3, model.num_patches)
    with torch.no_grad():
        ref_loss, ref_pred, ref_mask = ref_mae_forward(model, imgs, noise, ratio)
        out = model(imgs, ref_mask.bool())
    assert isinstance(out, MAEOutput)
    assert out.pred.shape == (3, 16, 16 * 16 * 3)
    assert int(out.mask.sum(1)[0]) == 16 - int(16 * (1 - ratio))
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.pred, ref_pred, rtol=1e-4, atol=1e-4)
    counts = ref_mask.sum(1)
    weighted = (out.loss_per_image * counts).sum() / counts.sum()
    torch.testing.assert_close(weighted, out.loss, rtol=1e-6, atol=0)


def test_backward_reaches_tokens_but_not_pos_embed():
    model = small_mae()
    mask = torch.tensor([[True, False, True, True]] * 2)
    model(torch.randn(2, 3, 32, 32), mask).loss.backward()
    assert model.cls_token.grad is not None and model.mask_token.grad is not None
    assert model.pos_embed.grad is None and not model.pos_embed.requires_grad
    assert not model.decoder_pos_embed.requires_grad
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "mask_token", "decoder_pos_embed"}


# --------------------------------------------------------------------------- state dict layout
def block_keys(prefix, dim, hidden):
    return {
        f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm1.bias": (dim,),
        f"{prefix}.attn.qkv.weight": (3 * dim, dim), f"{prefix}.attn.qkv.bias": (3 * dim,),
        f"{prefix}.attn.proj.weight": (dim, dim), f"{prefix}.attn.proj.bias": (dim,),
        f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,),
        f"{prefix}.mlp.fc1.weight": (hidden, dim), f"{prefix}.mlp.fc1.bias": (hidden,),
        f"{prefix}.mlp.fc2.weight": (dim, hidden), f"{prefix}.mlp.fc2.bias": (dim,),
    }


def official_layout():
    """Official MAE pretraining checkpoint layout for tiny, 32x32, 2+2 blocks, decoder 64."""
    D, Dd, N = 192, 64, 4
    shapes = {
        "cls_token": (1, 1, D), "pos_embed": (1, 1 + N, D),
        "patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,),
        "norm.weight": (D,), "norm.bias": (D,),
        "mask_token": (1, 1, Dd),
        "decoder_embed.weight": (Dd, D), "decoder_embed.bias": (Dd,),
        "decoder_pos_embed": (1, 1 + N, Dd),
        "decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,),
        "decoder_pred.weight": (16 * 16 * 3, Dd), "decoder_pred.bias": (16 * 16 * 3,),
    }
    for i in range(2):
        shapes.update(block_keys(f"blocks.{i}", D, 4 * D))
        shapes.update(block_keys(f"decoder_blocks.{i}", Dd, 4 * Dd))
    return shapes


def test_state_dict_is_official_layout_and_loads_strictly():
    model = small_mae()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_layout()
    assert not list(model.buffers())
    sd = {k: torch.randn(s) for k, s in official_layout().items()}
    model.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_load_mae_checkpoint_full_and_encoder_only(tmp_path):
    src, dst = small_mae(), small_mae()
    full = tmp_path / "checkpoint-799.pth"
    torch.save({"model": src.state_dict(), "epoch": 799,
                "args": argparse.Namespace(model="mae_vit_tiny_patch16", mask_ratio=0.75)}, full)
    res = load_mae_checkpoint(dst, full)
    assert not res.encoder_only and res.missing_keys == []
    for k, v in dst.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k

    # encoder-only, as the released mae_pretrain_vit_*.pth, here with a DDP prefix
    enc = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.encoder_state_dict().items()}}, enc)
    fresh = small_mae()
    dec_before = fresh.decoder_pred.weight.clone()
    res = load_mae_checkpoint(fresh, enc)
    assert res.encoder_only
    assert set(res.missing_keys) == {k for k in official_layout()
                                     if k == "mask_token" or k.startswith("decoder_")}
    assert torch.equal(fresh.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert torch.equal(fresh.decoder_pred.weight, dec_before)

    load_mae_checkpoint(small_mae(), {"state_dict": src.state_dict()})
    with pytest.raises(CheckpointError, match="nope.pth does not exist"):
        load_mae_checkpoint(dst, tmp_path / "nope.pth")
    bad = dict(src.state_dict())
    bad.pop("norm.bias")
    with pytest.raises(CheckpointError, match=r"1 missing: norm\.bias$"):
        load_mae_checkpoint(dst, bad)
    bad["norm.bias"], bad["extra"] = torch.zeros(3), torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 unexpected: extra; 1 of another shape .*: norm\.bias \(3,\) vs"):
        load_mae_checkpoint(dst, bad)
    encoder = {k: v for k, v in src.state_dict().items() if not k.startswith("decoder_") and k != "mask_token"}
    with pytest.raises(CheckpointError, match=r"is 192 wide, the model 384\)$"):
        load_mae_checkpoint(small_mae(embed_dim=384), encoder)  # an encoder-only file of another size


# ------------------------------------------------------------------------------- timm export
@pytest.mark.parametrize(
    "name, timm_name, img",
    [("mae_vit_tiny_patch16", "vit_tiny_patch16_224", 64),
     ("mae_vit_base_patch16", "vit_base_patch16_224", 224)],
)
def test_timm_export_matches_forward_features(name, timm_name, img):
    torch.manual_seed(0)
    model = build_mae(name, img_size=img, decoder_depth=1).eval()
    sd = to_timm_state_dict(model)
    assert not any(k == "mask_token" or k.startswith("decoder_") for k in sd)
    assert all(v.is_contiguous() and v.data_ptr() != model.state_dict()[k].data_ptr()
               for k, v in sd.items())
    kw = {} if img == 224 else {"img_size": img}
    vit = timm.create_model(timm_name, pretrained=False, num_classes=0, **kw).eval()
    vit.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, img, img)
    with torch.no_grad():
        ours = model.forward_encoder(x, torch.zeros(1, model.num_patches, dtype=torch.bool))
        theirs = vit.forward_features(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------- components
def test_pos_embed_matches_direct_formula():
    D, g = 16, 5
    ref = np.zeros((1 + g * g, D))
    for i in range(g):  # row (h)
        for j in range(g):  # column (w)
            for c in range(D // 4):
                omega = 1.0 / 10000 ** (c / (D / 4))
                t = 1 + i * g + j
                ref[t, c] = math.sin(j * omega)
                ref[t, D // 4 + c] = math.cos(j * omega)
                ref[t, D // 2 + c] = math.sin(i * omega)
                ref[t, 3 * D // 4 + c] = math.cos(i * omega)
    got = get_2d_sincos_pos_embed(D, g, cls_token=True)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    assert get_2d_sincos_pos_embed(D, g).shape == (g * g, D)

    model = small_mae(img_size=64)
    pe = torch.from_numpy(get_2d_sincos_pos_embed(192, 4, cls_token=True)).float()
    assert torch.equal(model.pos_embed[0], pe)


def test_patchify_roundtrip_and_order():
    model = small_mae(img_size=64)
    imgs = torch.randn(2, 3, 64, 64)
    x = model.patchify(imgs)
    assert x.shape == (2, 16, 768)
    assert torch.equal(model.unpatchify(x), imgs)
    # patch 5 = row 1, col 1; its first entries are pixel (0, 0) channels r, g, b
    torch.testing.assert_close(x[:, 5, :3], imgs[:, :, 16, 16])
    assert model.grid_size == (4, 4) and model.patch_size == 16 and model.num_patches == 16


def test_build_mae_names_and_errors():
    assert set(available_models()) == {
        "mae_vit_tiny_patch16", "mae_vit_small_patch16", "mae_vit_base_patch16",
        "mae_vit_large_patch16", "mae_vit_huge_patch14"}
    with pytest.raises(ValueError, match="mae_vit_base_patch16"):
        build_mae("mae_vit_gigantic")
    with pytest.raises((TypeError, ValueError), match="decoder_depth"):
        build_mae("mae_vit_tiny_patch16", decoder_layers=2)
    m = build_mae("mae_vit_huge_patch14", img_size=28, depth=1, decoder_depth=1)
    assert m.patch_size == 14 and m.cls_token.shape[-1] == 1280
    assert len(m.decoder_blocks) == 1 and m.decoder_blocks[0].attn.num_heads == 16


def test_mask_validation_and_ragged_batches():
    """Images may hide different numbers of patches; each image's outputs equal running it alone."""
    model = small_mae().eval()
    imgs = torch.randn(2, 3, 32, 32)
    uneven = torch.tensor([[True, True, False, False], [True, False, False, False]])
    with pytest.raises(ValueError, match="bool"):
        model(imgs, uneven.int())
    with pytest.raises(ValueError, match="bool tensor"):
        model(imgs, uneven[:, :3])
    both = model(imgs, uneven)
    latent = model.forward_encoder(imgs, uneven)
    assert latent.shape[1] == 1 + 3  # padded to the largest visible count
    for i in range(2):
        alone = model(imgs[i:i + 1], uneven[i:i + 1])
        torch.testing.assert_close(both.pred[i], alone.pred[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(both.loss_per_image[i], alone.loss_per_image[0], rtol=1e-5, atol=1e-6)
        k = int((~uneven[i]).sum())
        torch.testing.assert_close(latent[i, :1 + k], model.forward_encoder(imgs[i:i + 1], uneven[i:i + 1])[0])


def test_visible_tokens_in_ascending_order():
    model = small_mae().eval()
    imgs = torch.randn(1, 3, 32, 32)
    mask = torch.tensor([[False, True, False, True]])
    assert model.forward_encoder(imgs, mask).shape == (1, 3, 192)
    # Without blocks and norm the latent is CLS + (patch_embed + pos) of patches 0 and 2, in order.
    model.blocks, model.norm = torch.nn.ModuleList(), torch.nn.Identity()
    tok = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    torch.testing.assert_close(model.forward_encoder(imgs, mask)[:, 1:], tok[:, [0, 2]])


def test_bf16_autocast_cpu_loss_is_float32():
    torch.manual_seed(0)
    model = small_mae(drop_path=0.1).train()
    mask = torch.rand(2, 4).argsort(1) < 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32), mask)
    assert out.loss.dtype == torch.float32 and out.loss_per_image.dtype == torch.float32
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_attention_qk_and_key_padding():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4)
    x = torch.randn(2, 7, 32)
    q, k = attn.qk(x)
    assert q.shape == k.shape == (2, 4, 7, 8)
    qkv = attn.qkv(x)
    torch.testing.assert_close(q.transpose(1, 2).reshape(2, 7, 32), qkv[..., :32])
    torch.testing.assert_close(k.transpose(1, 2).reshape(2, 7, 32), qkv[..., 32:64])

    blk = Block(32, 4).eval()
    lengths = [7, 4]
    pad = torch.arange(7)[None, :] >= torch.tensor(lengths)[:, None]  # True = padded
    x_pad = torch.where(pad[..., None], torch.full_like(x, 1e3), x)  # garbage in padded slots
    with torch.no_grad():
        out_attn = attn(x_pad, key_padding_mask=pad)
        out_blk = blk(x_pad, key_padding_mask=pad)
        for b, n in enumerate(lengths):
            torch.testing.assert_close(out_attn[b, :n], attn(x[b:b + 1, :n])[0])
            torch.testing.assert_close(out_blk[b, :n], blk(x[b:b + 1, :n])[0])
