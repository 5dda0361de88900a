"""Segmentation pieces: metrics against the textbook formulas, label handling, sliding windows,
UperNet shapes, the training transform."""

import numpy as np
import pytest
import torch

from mimscale.downstream.dense import MultiLevelRescale, ViTBackbone
from mimscale.downstream.dense.encoder import DenseEncoder
from mimscale.downstream.segment import (
    SegTrainTransform,
    UperNetSegmentor,
    confusion_matrix,
    majority_baseline,
    reduce_zero_label,
    segmentation_metrics,
    slide_inference,
)


def _direct_metrics(pred, label, k, ignore=255):
    """Per-class IoU and accuracy by counting pixels one class at a time."""
    valid = label != ignore
    ious, accs = [], []
    for c in range(k):
        p, g = (pred == c) & valid, (label == c) & valid
        inter, union = (p & g).sum(), (p | g).sum()
        if union > 0:
            ious.append(inter / union)
        if g.sum() > 0:
            accs.append(inter / g.sum())
    return float(np.mean(ious)), float(np.mean(accs)), float(((pred == label) & valid).sum() / valid.sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_direct_counting(seed):
    rng = np.random.default_rng(seed)
    k = 6
    label = rng.integers(0, k - 1, (40, 30))  # class k-1 never in the ground truth
    label[rng.random(label.shape) < 0.1] = 255
    pred = np.where(rng.random(label.shape) < 0.6, label, rng.integers(0, k - 2, label.shape))
    pred[pred == 255] = 0
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), k)
    assert int(conf.sum()) == int((label != 255).sum())
    m = segmentation_metrics(conf)
    miou, macc, aacc = _direct_metrics(pred, label, k)
    assert m["mIoU"] == pytest.approx(miou) and m["mAcc"] == pytest.approx(macc)
    assert m["aAcc"] == pytest.approx(aacc)
    assert m["IoU"][k - 1] is None and m["Acc"][k - 1] is None  # absent everywhere: skipped


def test_metrics_edge_cases_and_bad_labels():
    perfect = segmentation_metrics(confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), 3))
    assert perfect["mIoU"] == perfect["mAcc"] == perfect["aAcc"] == 1.0
    conf = confusion_matrix(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]), 2)
    base = majority_baseline(conf)
    assert base["mIoU"] == pytest.approx((3 / 4 + 0) / 2) and base["aAcc"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 3)


def test_reduce_zero_label():
    assert reduce_zero_label(np.array([0, 1, 150], np.uint8)).tolist() == [255, 0, 149]


class _Pointwise(torch.nn.Module):
    """Logits that depend only on each pixel's value: sliding windows must reproduce them exactly."""

    num_classes = 3

    def forward(self, x):
        return torch.cat([x[:, :1], x[:, 1:2] * 2, -x[:, 2:3]], dim=1)


def test_slide_inference_covers_every_pixel_and_averages_overlaps():
    x = torch.randn(1, 3, 50, 37)
    out = slide_inference(_Pointwise(), x, crop=16, stride=11)
    torch.testing.assert_close(out, _Pointwise()(x))
    small = torch.randn(1, 3, 10, 12)  # smaller than one window
    torch.testing.assert_close(slide_inference(_Pointwise(), small, 16, 11), _Pointwise()(small))


def test_upernet_logits_and_losses():
    torch.manual_seed(0)
    vit = ViTBackbone(patch_size=8, embed_dim=32, depth=4, num_heads=2, pretrain_img_size=32,
                      window_size=0, out_indices=[0, 1, 2, 3])
    model = UperNetSegmentor(DenseEncoder(vit, MultiLevelRescale(32, 8)), num_classes=5, channels=16,
                             aux_channels=8)
    images, labels = torch.rand(2, 3, 44, 36), torch.randint(0, 5, (2, 44, 36))
    labels[:, :4] = 255
    assert model(images).shape == (2, 5, 44, 36)  # not a multiple of the patch: padded, cropped back
    losses = model(images, labels)
    assert set(losses) == {"loss_seg", "loss_aux"}
    assert losses["loss_seg"].item() == pytest.approx(float(np.log(5)), rel=0.3)
    sum(losses.values()).backward()
    assert vit.blocks[0].attn.qkv.weight.grad is not None


def test_train_transform_crops_pads_with_ignore_and_keeps_label_alignment():
    torch.manual_seed(0)
    t = SegTrainTransform(crop=32, scale=(64, 24), ratio_range=(0.5, 1.0), photometric=True)
    image = torch.zeros(3, 40, 60)
    label = torch.zeros(40, 60, dtype=torch.long)
    image[0, :, 30:] = 1.0
    label[:, 30:] = 1
    for _ in range(10):
        out_img, out_lab = t(image, label)
        assert out_img.shape == (3, 32, 32) and out_lab.shape == (32, 32)
        assert set(out_lab.unique().tolist()) <= {0, 1, 255}
        pad = out_lab == 255
        if pad.any():
            assert float(out_img[:, pad].abs().max()) == 0.0
