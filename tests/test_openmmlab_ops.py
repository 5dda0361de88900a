"""The plugin's torchvision kernels behind mmcv-lite's ``mmcv.ops``: RoIAlign values and gradients,
NMS keep indices, checked against torchvision and against hand-computed references, through mmcv's
own Python wrappers (what mmdet calls)."""

import pytest
import torch
import torchvision
from extras import need


@pytest.fixture(scope="module")
def ops():
    need("mmcv")
    import mimscale.downstream.openmmlab as plugin
    from mimscale.downstream.openmmlab import torchvision_ops

    # CI installs the declared extra (mmcv-lite): the plugin's kernels must be what runs there
    assert torchvision_ops.compiled_ops_available() is not plugin.TORCHVISION_OPS
    if not plugin.TORCHVISION_OPS:
        pytest.skip("full mmcv is installed: its compiled kernels are used, not the plugin's")
    import mmcv.ops

    return mmcv.ops


def test_roi_align_matches_a_hand_computed_bilinear_average(ops):
    # on a linear ramp bilinear sampling is exact, so each bin's average is the ramp at its centre
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    feat = (xs + 10 * ys)[None, None]
    rois = torch.tensor([[0.0, 2, 3, 10, 7]])  # (batch index, x1, y1, x2, y2): 8 wide, 4 high
    out = ops.RoIAlign(output_size=2, spatial_scale=1.0, sampling_ratio=0, aligned=True)(feat, rois)
    centres_x, centres_y = torch.tensor([4.0, 8.0]), torch.tensor([4.0, 6.0])
    # aligned: pixel i covers [i, i + 1), so continuous coordinate c reads the ramp at c - 0.5
    expected = (centres_x[None, :] - 0.5) + 10 * (centres_y[:, None] - 0.5)
    torch.testing.assert_close(out[0, 0], expected)


@pytest.mark.parametrize("aligned,sampling_ratio,scale", [(True, 0, 0.25), (False, 2, 0.5)])
def test_roi_align_equals_torchvision_forward_and_backward(ops, aligned, sampling_ratio, scale):
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, 12, 14, generator=g, dtype=torch.float64, requires_grad=True)
    xy = torch.rand(6, 2, generator=g) * 30
    wh = torch.rand(6, 2, generator=g) * 20 + 1
    rois = torch.cat([torch.tensor([0, 1, 1, 0, 1, 0.0])[:, None], xy, xy + wh], 1).double()
    out = ops.roi_align(feat, rois, (3, 4), scale, sampling_ratio, "avg", aligned)
    ref = torchvision.ops.roi_align(feat, rois, (3, 4), scale, sampling_ratio, aligned)
    torch.testing.assert_close(out, ref)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (mine,) = torch.autograd.grad(out, feat, grad)
    (theirs,) = torch.autograd.grad(ref, feat, grad)
    torch.testing.assert_close(mine, theirs)
    assert torch.autograd.gradcheck(lambda f: ops.roi_align(f, rois, 2, scale, sampling_ratio, "avg", aligned),
                                    (feat,))


def test_nms_keeps_the_hand_computed_indices(ops):
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [21, 20, 31, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # IoU(0, 1) = 81 / 119 = 0.68; IoU(2, 3) = 90 / 110 = 0.82
    dets, keep = ops.nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [3, 0]
    torch.testing.assert_close(dets, torch.cat([boxes[[3, 0]], scores[[3, 0], None]], 1))
    assert ops.nms(boxes, scores, iou_threshold=0.7)[1].tolist() == [3, 0, 1]
    assert ops.nms(boxes, scores, iou_threshold=0.5, max_num=1)[1].tolist() == [3]
    assert ops.nms(boxes, scores, iou_threshold=0.5, score_threshold=0.85)[1].tolist() == [3, 0]
    # offset 1 (legacy pixel boxes): unit boxes side by side overlap by one pixel column, IoU 1/3
    touching = torch.tensor([[0, 0, 1, 1], [1, 0, 2, 1.0]])
    pair = torch.tensor([0.9, 0.8])
    assert ops.nms(touching, pair, 0.3, offset=0)[1].tolist() == [0, 1]
    assert ops.nms(touching, pair, 0.3, offset=1)[1].tolist() == [0]


def test_nms_and_batched_nms_equal_torchvision_on_random_boxes(ops):
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(300, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(300, 2, generator=g) * 40 + 1], 1)
    scores = torch.rand(300, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    assert torch.equal(ops.nms(boxes, scores, 0.5)[1], torchvision.ops.nms(boxes, scores, 0.5))
    _, keep = ops.batched_nms(boxes, scores, labels, dict(type="nms", iou_threshold=0.5))
    assert torch.equal(keep, torchvision.ops.batched_nms(boxes, scores, labels, 0.5))
    # above split_thr mmcv runs class by class; the result must not change
    _, split = ops.batched_nms(boxes, scores, labels, dict(type="nms", iou_threshold=0.5, split_thr=10))
    assert torch.equal(split, keep)


def test_kernels_torchvision_lacks_say_so_by_name(ops):
    from mimscale.errors import MissingExtraError

    feat, rois = torch.ones(1, 1, 4, 4), torch.tensor([[0.0, 0, 0, 2, 2]])
    with pytest.raises(MissingExtraError, match="roi_align_forward.*max.*full mmcv==2.1.0"):
        ops.RoIAlign(2, pool_mode="max")(feat, rois)
    with pytest.raises(MissingExtraError, match="'sigmoid_focal_loss_forward'.*full mmcv"):
        ops.sigmoid_focal_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    # pure-Python mmcv ops (here mmseg's and mmdet's point_sample) work unchanged
    grid = torch.tensor([[[0.5, 0.5]]])
    assert ops.point_sample(torch.arange(16.0).view(1, 1, 4, 4), grid).shape == (1, 1, 1)


BUILD_FROM_CONFIGS = """
import sys
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mimscale.downstream.openmmlab import config_path  # only to find the files; custom_imports loads it
for name, scope in (("upernet_vit-b_160k_ade20k.py", "mmseg"), ("mask_rcnn_vit-b_1x_coco.py", "mmdet")):
    cfg = Config.fromfile(str(config_path(name)))
    cfg.model.backbone.update(arch="mae_vit_tiny_patch16", init_cfg=None)
    init_default_scope(scope)
    registry = __import__(scope + ".registry", fromlist=["MODELS"])
    model = registry.MODELS.build(cfg.model)
    print(name, type(model).__name__)
import mmcv.ops
print("RoIAlign", mmcv.ops.RoIAlign.__module__)
"""


def test_a_users_config_load_alone_makes_both_configs_build(ops):
    """As mmdet's / mmseg's train scripts do it, in a fresh interpreter: the config's
    ``custom_imports`` loads the plugin, which installs the kernels before the models import
    ``mmcv.ops``."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", BUILD_FROM_CONFIGS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "upernet_vit-b_160k_ade20k.py EncoderDecoder" in proc.stdout
    assert "mask_rcnn_vit-b_1x_coco.py MaskRCNN" in proc.stdout and "RoIAlign mmcv.ops.roi_align" in proc.stdout
