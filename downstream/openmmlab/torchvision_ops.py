"""mmcv's compiled kernels that Mask R-CNN and UperNet reach, computed by ``torchvision.ops``.

The ``openmmlab`` extra installs mmcv-lite (full mmcv has no wheel for current torch), which has no
``mmcv._ext``: every ``mmcv.ops`` module asks ``ext_loader.load_ext('_ext', ...)`` for its kernels
at import, so ``import mmcv.ops`` (and with it mmdet's and mmseg's models) fails. :func:`install`
makes ``load_ext`` answer with :class:`TorchvisionKernels` when the compiled module is missing;
mmcv's own Python (``RoIAlign``, ``nms``, ``batched_nms``, ``point_sample``, ...) then runs
unchanged on torchvision's kernels. Kernels torchvision lacks raise :class:`MissingExtraError`
when called, naming the op, so a config that needs one says so instead of computing garbage.
Written for mmcv 2.1.0's kernel signatures, the version the extra pins.
"""

from __future__ import annotations

import importlib.util

from mimscale.errors import MissingExtraError

SUPPLIED = ("roi_align_forward", "roi_align_backward", "nms")


def _missing(name: str):
    def kernel(*args, **kwargs):
        raise MissingExtraError(
            f"mmcv op {name!r} is compiled-only and mmcv-lite has none; install full mmcv==2.1.0 built "
            f"for your torch (mimscale supplies only {', '.join(SUPPLIED)} from torchvision)"
        )

    kernel.__name__ = name
    return kernel


class TorchvisionKernels:
    """Stands in for the ``mmcv._ext`` module: the kernels in :data:`SUPPLIED`, called with mmcv's
    signatures (outputs written into the tensors passed in), and a raising stand-in for any other."""

    @staticmethod
    def roi_align_forward(input, rois, output, argmax_y, argmax_x, *, aligned_height, aligned_width,
                          spatial_scale, sampling_ratio, pool_mode, aligned):
        import torchvision

        if pool_mode != 1:  # mmcv's code for 'max', which torchvision does not have
            _missing("roi_align_forward (pool_mode='max')")()
        out = torchvision.ops.roi_align(input, rois.to(input.dtype), (aligned_height, aligned_width),
                                        spatial_scale, sampling_ratio, aligned)
        output.copy_(out)

    @staticmethod
    def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, *, aligned_height, aligned_width,
                           spatial_scale, sampling_ratio, pool_mode, aligned):
        import torch
        import torchvision  # noqa: F401  (registers torch.ops.torchvision)

        if pool_mode != 1:
            _missing("roi_align_backward (pool_mode='max')")()
        n, c, h, w = grad_input.shape
        grad = torch.ops.torchvision._roi_align_backward(
            grad_output, rois.to(grad_output.dtype), spatial_scale, aligned_height, aligned_width,
            n, c, h, w, sampling_ratio, aligned)
        grad_input.copy_(grad)

    @staticmethod
    def nms(boxes, scores, *, iou_threshold, offset=0):
        """Kept indices, highest score first; ``offset`` 1 is the legacy pixel convention (a box
        from x1 to x2 is x2 - x1 + 1 wide), the same as widening every box by one."""
        import torchvision

        if offset:
            boxes = boxes.clone()
            boxes[:, 2:] += offset
        return torchvision.ops.nms(boxes.float(), scores.float(), iou_threshold)

    @staticmethod
    def get_compiler_version():
        return "none (mmcv-lite; roi_align and nms from torchvision)"

    @staticmethod
    def get_compiling_cuda_version():
        return "none (mmcv-lite; roi_align and nms from torchvision)"

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(name)


def compiled_ops_available() -> bool:
    """Whether the installed mmcv has its compiled ``mmcv._ext`` (full mmcv)."""
    return importlib.util.find_spec("mmcv") is not None and importlib.util.find_spec("mmcv._ext") is not None


def install() -> bool:
    """Route mmcv's kernel loading to :class:`TorchvisionKernels` when ``mmcv._ext`` is missing;
    returns whether it did (False with full mmcv or without mmcv). Idempotent."""
    if importlib.util.find_spec("mmcv") is None or compiled_ops_available():
        return False
    from mmcv.utils import ext_loader

    if getattr(ext_loader.load_ext, "_mimscale", False):
        return True
    real = ext_loader.load_ext
    kernels = TorchvisionKernels()

    def load_ext(name, funcs):
        return kernels if name == "_ext" else real(name, funcs)

    load_ext._mimscale = True
    ext_loader.load_ext = load_ext
    return True
