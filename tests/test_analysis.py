"""The analysis math against direct implementations: attention distance and entropy, unbiased HSIC
and minibatch CKA, PIMR / Global PIMR, mask coverage, and how checkpoints of every kind load."""

import argparse
import math

import numpy as np
import pytest
import torch

from mimscale.pretrain.models import build_mae, to_timm_state_dict
from mimscale.tools.analysis import (
    MinibatchCKA,
    attention_distance,
    attention_entropy,
    global_pimr,
    patch_attention,
    pimr,
    unbiased_hsic,
)
from mimscale.tools.analysis.attention import attention_stats
from mimscale.tools.analysis.cka import gram, layer_cka
from mimscale.tools.analysis.curves import panel_of, smooth
from mimscale.tools.analysis.encoders import block_inputs, infer_architecture, load_encoder
from mimscale.tools.analysis.masks import Coverage, parse_strategies
from mimscale.tools.analysis.output import AnalysisError
from mimscale.tools.analysis.pimr import read_table

TINY = dict(img_size=32, patch_size=8, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=1)


# ------------------------------------------------------------------------------ attention


def test_attention_distance_of_a_hand_made_map():
    # 2x2 patches of 16 px: 0 1 / 2 3. Rows: 0 -> 1 (16 px), 1 -> 3 (16 px), 2 -> 1 (diagonal), 3 -> itself.
    attn = torch.zeros(1, 1, 4, 4)
    for query, key in [(0, 1), (1, 3), (2, 1), (3, 3)]:
        attn[0, 0, query, key] = 1.0
    want = (16 + 16 + 16 * math.sqrt(2) + 0) / 4
    assert attention_distance(attn, (2, 2), 16).item() == pytest.approx(want, rel=1e-6)
    uniform = torch.full((1, 4, 4), 0.25)  # every query: 0, 16, 16 and 16√2 px away
    assert attention_distance(uniform, (2, 2), 16).item() == pytest.approx((32 + 16 * math.sqrt(2)) / 4, rel=1e-6)


def test_attention_distance_equals_a_direct_double_loop_on_a_non_square_grid():
    torch.manual_seed(0)
    grid, patch = (2, 3), 14
    attn = torch.randn(2, 3, 6, 6).softmax(-1)
    got = attention_distance(attn, grid, patch)
    want = torch.zeros(2, 3)
    for b in range(2):
        for h in range(3):
            total = 0.0
            for i in range(6):
                for j in range(6):
                    (ri, ci), (rj, cj) = divmod(i, grid[1]), divmod(j, grid[1])
                    total += attn[b, h, i, j].item() * patch * math.hypot(ri - rj, ci - cj)
            want[b, h] = total / 6
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_entropy_of_uniform_and_one_hot_rows():
    n = 16
    uniform = torch.full((n, n), 1.0 / n)
    direct = -sum((1 / n) * math.log(1 / n + 1e-6) for _ in range(n))
    assert attention_entropy(uniform).item() == pytest.approx(direct, rel=1e-6)
    assert attention_entropy(uniform).item() == pytest.approx(math.log(n), abs=1e-4)
    one_hot = torch.eye(n)
    assert attention_entropy(one_hot).item() == pytest.approx(-math.log(1 + 1e-6), abs=1e-7)  # float32
    assert abs(attention_entropy(one_hot).item()) < 1e-5
    rows = torch.randn(3, 5, 7).softmax(-1)
    direct_rows = [[-sum(a * math.log(a + 1e-6) for a in row.tolist()) for row in m] for m in rows]
    torch.testing.assert_close(attention_entropy(rows), torch.tensor(direct_rows).mean(-1), rtol=1e-5, atol=1e-6)


def test_patch_attention_drops_cls_and_renormalises():
    torch.manual_seed(1)
    q, k = torch.randn(2, 3, 1 + 9, 8), torch.randn(2, 3, 1 + 9, 8)
    full = (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(-1)   # over CLS + patches
    patches = full[..., 1:, 1:]
    want = patches / patches.sum(-1, keepdim=True)                 # drop CLS, re-normalise
    got = patch_attention(q, k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 3, 9))
    q2, k2 = q.clone(), k.clone()
    q2[:, :, 0], k2[:, :, 0] = 100.0, -100.0                       # the CLS token plays no part
    torch.testing.assert_close(patch_attention(q2, k2), got)


def test_block_inputs_are_what_norm1_reads_in_the_models_own_forward():
    torch.manual_seed(0)
    model = build_mae("mae_vit_tiny_patch16", **TINY).eval()
    images = torch.randn(2, 3, 32, 32)
    seen = []
    hooks = [blk.norm1.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for blk in model.blocks]
    with torch.no_grad():
        model.forward_encoder(images, torch.zeros(2, 16, dtype=torch.bool))
    for h in hooks:
        h.remove()
    mine = list(block_inputs(model, images))
    assert len(mine) == len(seen) == 12
    for a, b in zip(mine, seen):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_attention_stats_are_image_means_of_per_image_values():
    torch.manual_seed(0)
    model = build_mae("mae_vit_tiny_patch16", **TINY).eval()
    images = torch.randn(5, 3, 32, 32)
    dist, ent = attention_stats(model, images, batch_size=2)
    assert dist.shape == ent.shape == (12, 3)
    per_image = [attention_stats(model, images[i:i + 1]) for i in range(5)]
    torch.testing.assert_close(dist, torch.stack([d for d, _ in per_image]).mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, torch.stack([e for _, e in per_image]).mean(0), rtol=1e-5, atol=1e-5)
    assert float(ent.max()) <= math.log(16) + 1e-4 and float(ent.min()) >= 0
    assert float(dist.min()) >= 0 and float(dist.max()) <= 8 * 3 * math.sqrt(2)


# ------------------------------------------------------------------------------ CKA


def _u_centre(k):
    """Székely & Rizzo's U-centering: an independent route to the unbiased HSIC."""
    n = k.shape[0]
    k = k.clone().fill_diagonal_(0)
    u = k - k.sum(0, keepdim=True) / (n - 2) - k.sum(1, keepdim=True) / (n - 2) + k.sum() / ((n - 1) * (n - 2))
    return u.fill_diagonal_(0)


def _hsic_direct(k, l):  # noqa: E741
    n = k.shape[0]
    return (_u_centre(k) * _u_centre(l)).sum() / (n * (n - 3))


def _cka_full(x, y):
    kx, ky = x @ x.T, y @ y.T
    return float(_hsic_direct(kx, ky) / (_hsic_direct(kx, kx) * _hsic_direct(ky, ky)).sqrt())


def _cka_minibatch(x, y, batch):
    acc = MinibatchCKA(1, 1)
    for s in range(0, x.shape[0], batch):
        acc.update(gram(x[s:s + batch])[None], gram(y[s:s + batch])[None])
    return float(acc.value())


def test_unbiased_hsic_equals_the_u_centred_estimator_for_every_pair():
    torch.manual_seed(0)
    xs = [torch.randn(12, d, dtype=torch.float64) for d in (3, 7)]
    ys = [torch.randn(12, d, dtype=torch.float64) for d in (5, 2, 9)]
    got = unbiased_hsic(torch.stack([gram(x) for x in xs]), torch.stack([gram(y) for y in ys]))
    want = torch.tensor([[float(_hsic_direct(gram(x), gram(y))) for y in ys] for x in xs], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(AnalysisError, match="at least 4"):
        unbiased_hsic(gram(xs[0][:3])[None], gram(ys[0][:3])[None])


def test_cka_is_one_with_itself_and_invariant_to_rotation_and_scale():
    torch.manual_seed(0)
    x = torch.randn(96, 20, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(20, 12, dtype=torch.float64)) + torch.randn(96, 12, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    assert _cka_minibatch(x, x, 32) == pytest.approx(1.0, abs=1e-12)
    assert _cka_minibatch(x, x @ rotation, 32) == pytest.approx(1.0, abs=1e-10)
    assert _cka_minibatch(x, 3.7 * x, 32) == pytest.approx(1.0, abs=1e-12)
    base = _cka_minibatch(x, y, 32)
    assert 0.05 < base < 0.95  # related but not the same: the checks above could fail
    assert _cka_minibatch(x @ rotation, 0.25 * y, 32) == pytest.approx(base, abs=1e-10)


def test_minibatch_cka_equals_full_batch_cka():
    torch.manual_seed(0)
    n = 2048
    x = torch.randn(n, 48, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(48, 24, dtype=torch.float64) / 6) + 0.5 * torch.randn(n, 24, dtype=torch.float64)
    full = _cka_full(x, y)
    # one minibatch holding every sample is the full-batch unbiased estimator, exactly
    assert _cka_minibatch(x[:256], y[:256], 256) == pytest.approx(_cka_full(x[:256], y[:256]), abs=1e-12)
    # minibatches of 256: the same value within the stated tolerance of 0.01 (measured: ~5e-4)
    assert abs(_cka_minibatch(x, y, 256) - full) < 0.01, (full, _cka_minibatch(x, y, 256))


def test_layer_cka_of_a_model_with_itself_has_a_unit_diagonal():
    torch.manual_seed(0)
    model = build_mae("mae_vit_tiny_patch16", **TINY).eval()
    images = torch.randn(10, 3, 32, 32)
    matrix = layer_cka(model, images, model, images, batch_size=4)  # 4 + 4, the trailing 2 skipped
    assert matrix.shape == (12, 12)
    torch.testing.assert_close(torch.diagonal(matrix), torch.ones(12), rtol=0, atol=1e-5)
    torch.testing.assert_close(matrix, matrix.T, rtol=0, atol=1e-5)
    with pytest.raises(AnalysisError, match="at least 4"):
        layer_cka(model, images, model, images, batch_size=3)


# ------------------------------------------------------------------------------ PIMR


def test_pimr_and_global_pimr_on_a_hand_made_table():
    a = np.array([80.0, 82.0, 84.0, 83.0])    # ratios 0.5, 0.6, 0.75, 0.9
    b = np.array([70.0, 75.0, 80.0, 78.0])
    np.testing.assert_allclose(pimr(a), [0.0, 0.5, 1.0, 0.75])
    np.testing.assert_allclose(pimr(b), [0.0, 0.5, 1.0, 0.8])
    g = global_pimr({"sbam": a, "mae": b})   # global min 70, max 84
    np.testing.assert_allclose(g["sbam"], (a - 70) / 14)
    np.testing.assert_allclose(g["mae"], (b - 70) / 14)
    assert np.isnan(pimr(np.array([81.0, 81.0]))).all()   # no range: undefined, not 0


def test_read_table_averages_repeats_and_names_missing_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("model,mask_ratio,accuracy\nmae,0.75,80\nmae,0.75,82\nmae,0.9,79.5%\n")
    assert read_table(path) == {"mae": {0.75: [80.0, 82.0], 0.9: [79.5]}}
    bad = tmp_path / "bad.csv"
    bad.write_text("name,r,acc\nmae,0.75,80\n")
    with pytest.raises(AnalysisError, match=r"no model \(model / recipe / checkpoint\), mask ratio"):
        read_table(bad)
    assert read_table(bad, model_key="name", ratio_key="r") == {"mae": {0.75: [80.0]}}
    bad.write_text("model,mask_ratio,accuracy\nmae,high,80\n")
    with pytest.raises(AnalysisError, match="must be numbers"):
        read_table(bad)


# ------------------------------------------------------------------------------ mask coverage


def test_coverage_on_hand_made_masks():
    fg = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    c = Coverage.of(mask, fg)
    assert c.object_hidden() == pytest.approx(2 / 3)       # object patches: 3, hidden: 2
    assert c.background_hidden() == pytest.approx(3 / 5)   # background: 5, hidden: 3
    obj, bg = c.random_expectation()                      # ratios 0.5 and 0.75
    assert obj == pytest.approx((0.5 * 2 + 0.75 * 1) / 3)
    assert bg == pytest.approx((0.5 * 2 + 0.75 * 3) / 5)
    assert c.adaptive
    torch.manual_seed(0)
    ratios, sizes = torch.rand(50), torch.rand(50)
    c.ratio, c.object_size = ratios, sizes
    assert c.size_correlation() == pytest.approx(np.corrcoef(ratios.numpy(), sizes.numpy())[0, 1], abs=1e-6)


def test_parse_strategies():
    assert parse_strategies("random, sbam=a/sal.pth", "ck") == [("random", "random", "ck"),
                                                              ("sbam (sal)", "sbam", "a/sal.pth")]
    with pytest.raises(AnalysisError, match="unknown strategy 'magic'; valid: random"):
        parse_strategies("random,magic", None)


# ------------------------------------------------------------------------------ curves


def test_curve_panels_group_related_keys():
    assert panel_of("loss") == panel_of("loss_pixel") == panel_of("loss_mam") == "loss terms"
    assert panel_of("loss_shot1") == panel_of("loss_shot2") == "per-shot losses"
    assert panel_of("plb_p_0") == panel_of("plb_p_11") == "PLB head distribution (updated each epoch)"
    assert panel_of("mask_ratio") == panel_of("gpa_alpha_soft") == panel_of("salience_fallback")
    assert panel_of("something_new_3") == panel_of("something_new_4") == "something_new"
    assert smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no ramp from 0
    assert smooth([0.0, 10.0], 0.5) == pytest.approx([0.0, 10 * 0.5 / 0.75])


# ------------------------------------------------------------------------------ checkpoints


def test_encoders_load_from_timm_and_official_mae_files(tmp_path):
    torch.manual_seed(0)
    model = build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, decoder_embed_dim=32, decoder_depth=1,
                      decoder_num_heads=2)
    timm_sd = {**to_timm_state_dict(model), "head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)}
    torch.save(timm_sd, tmp_path / "timm.pth")
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="x")}, tmp_path / "mae.pth")
    images = torch.randn(2, 3, 32, 32)
    want = attention_stats(model.eval(), images)
    for name in ("timm.pth", "mae.pth"):
        enc = load_encoder(tmp_path / name)
        assert enc.label == name[:-4]
        assert enc.model.patch_size == 8 and enc.model.patch_embed.img_size == (32, 32)
        got = attention_stats(enc.model, images)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    name, kwargs = infer_architecture(to_timm_state_dict(model))
    assert name == "mae_vit_tiny_patch16" and kwargs["img_size"] == 32
    odd = to_timm_state_dict(build_mae("mae_vit_tiny_patch16", depth=5, **TINY))
    with pytest.raises(AnalysisError, match="no model preset has width 192 and 5 blocks"):
        infer_architecture(odd)
    with pytest.raises(AnalysisError, match="'cls_token' is missing"):
        infer_architecture({"weight": torch.zeros(1)})
