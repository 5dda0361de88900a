"""Test-only: mmcv's few compiled ops for Mask R-CNN and UperNet, from torchvision.ops.

mmcv-lite (what CI installs: full mmcv has no wheel for current torch) ships no ``mmcv._ext``, and
importing ``mmdet.models`` / ``mmseg.models`` then fails at ``import mmcv.ops``. ``install()``
puts a stand-in ``mmcv.ops`` in ``sys.modules`` with real ``RoIAlign``, ``roi_align``, ``nms``
and ``batched_nms`` (torchvision's kernels, mmcv's call signatures); any other op is a placeholder
that raises when used. With full mmcv installed it does nothing. Never part of shipped code.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import types

import torch
import torchvision
from torch import nn


def roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=0, pool_mode="avg", aligned=True):
    if pool_mode != "avg":
        raise NotImplementedError("the torchvision stand-in only has pool_mode='avg'")
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    return torchvision.ops.roi_align(input, rois.to(input.dtype), size, spatial_scale, sampling_ratio, aligned)


class RoIAlign(nn.Module):
    def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=0, pool_mode="avg", aligned=True,
                 use_torchvision=False):
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio, self.pool_mode, self.aligned = sampling_ratio, pool_mode, aligned

    def forward(self, input, rois):
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                         self.pool_mode, self.aligned)


def nms(boxes, scores, iou_threshold, offset=0, score_threshold=0, max_num=-1):
    keep = scores > score_threshold if score_threshold > 0 else torch.ones_like(scores, dtype=torch.bool)
    idx = keep.nonzero().flatten()
    order = torchvision.ops.nms(boxes[idx].float(), scores[idx].float(), iou_threshold)
    inds = idx[order][:max_num] if max_num > 0 else idx[order]
    return torch.cat([boxes[inds], scores[inds, None]], dim=1), inds


def batched_nms(boxes, scores, idxs, nms_cfg, class_agnostic=False):
    if nms_cfg is None:
        inds = scores.sort(descending=True).indices
        return torch.cat([boxes[inds], scores[inds, None]], dim=1), inds
    cfg = dict(nms_cfg)
    cfg.pop("type", None)
    cfg.pop("split_thr", None)
    iou, max_num = cfg.pop("iou_threshold"), cfg.pop("max_num", -1)
    if class_agnostic:
        inds = torchvision.ops.nms(boxes.float(), scores.float(), iou)
    else:
        inds = torchvision.ops.batched_nms(boxes.float(), scores.float(), idxs, iou)
    if max_num > 0:
        inds = inds[:max_num]
    return torch.cat([boxes[inds], scores[inds, None]], dim=1), inds


def _placeholder(name: str):
    def fail(*args, **kwargs):
        raise NotImplementedError(f"mmcv.ops.{name} is a compiled op that the test stand-in lacks")

    return type(name, (nn.Module,), {"__init__": fail, "__module__": "mmcv.ops"})


def _ops_module() -> types.ModuleType:
    ops = types.ModuleType("mmcv.ops")
    ops.__dict__.update(roi_align=roi_align, RoIAlign=RoIAlign, nms=nms, batched_nms=batched_nms)

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(name)
        setattr(ops, name, value)
        return value

    ops.__getattr__ = __getattr__
    ops.__path__ = []
    return ops


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``import mmcv.ops.<anything>`` with the stand-in."""

    def __init__(self, ops):
        self.ops = ops

    def find_spec(self, name, path=None, target=None):
        if name == "mmcv.ops" or name.startswith("mmcv.ops."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return self.ops

    def exec_module(self, module):
        pass


def install() -> bool:
    """Provide the stand-in if mmcv's compiled ops are missing; True when it did."""
    try:
        import mmcv._ext  # noqa: F401
        return False
    except ImportError:
        pass
    import mmcv

    if getattr(sys.modules.get("mmcv.ops"), "__getattr__", None) is not None:
        return True  # already installed
    ops = _ops_module()
    for name in [m for m in sys.modules if m == "mmcv.ops" or m.startswith("mmcv.ops.")]:
        del sys.modules[name]  # a half-imported real package from an earlier failed import
    sys.modules["mmcv.ops"] = ops
    # Submodules named like an op must not be imported afresh: the import system would then set
    # ``mmcv.ops.<name>`` to the submodule, hiding the function of that name.
    for name in ("nms", "roi_align", "point_sample", "deform_conv", "sync_bn", "focal_loss"):
        sys.modules[f"mmcv.ops.{name}"] = ops
    sys.meta_path.insert(0, _Finder(ops))
    mmcv.ops = ops
    return True
