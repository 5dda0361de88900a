"""OpenMMLab plugin: ``import mimscale.downstream.openmmlab`` (or ``custom_imports`` in a config)
registers ``MimViT``, ``MimSimpleFPN``, ``MimMultiLevelNeck``, ``MimLN2d`` (channel LayerNorm
for conv heads) and ``MimLayerDecayOptimizerConstructor`` in mmdet's and mmseg's registries (those installed).

Needs ``pip install 'mimscale[openmmlab]'`` (without mmdet / mmseg nothing is registered and
``REGISTERED`` is empty; the converter still works). That extra's mmcv-lite has no compiled ops:
importing the plugin then routes the kernels the shipped configs reach (RoIAlign, NMS) to
torchvision (:mod:`.torchvision_ops`); full mmcv's own kernels are used when installed.
Shipped configs: :func:`config_path`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from . import torchvision_ops
from .convert import TARGET_IMG_SIZE, convert_to_openmmlab

CONFIG_DIR = Path(__file__).parent / "configs"
REGISTRIES = ("mmdet.registry", "mmseg.registry")


def config_path(name: str) -> Path:
    """Path of a shipped config, e.g. ``config_path('mask_rcnn_vit-b_1x_coco.py')``."""
    path = CONFIG_DIR / name
    if not path.is_file():
        valid = sorted(p.name for p in CONFIG_DIR.glob("*.py"))
        raise FileNotFoundError(f"no shipped config {name!r}; valid: {', '.join(valid)}")
    return path


def register_all() -> list[str]:
    """Register the modules in every installed OpenMMLab registry; returns the registry modules
    used (none without mmdet / mmseg, so that the converter works on a machine without them)."""
    used = []
    for name in REGISTRIES:
        try:
            reg = importlib.import_module(name)
        except ImportError:
            continue
        from . import modules

        for cls in (modules.MimViT, modules.MimSimpleFPN, modules.MimMultiLevelNeck):
            reg.MODELS.register_module(module=cls, force=True)
        reg.MODELS.register_module(name="MimLN2d", module=modules.LayerNorm2d, force=True)
        reg.OPTIM_WRAPPER_CONSTRUCTORS.register_module(module=modules.MimLayerDecayOptimizerConstructor, force=True)
        used.append(name)
    return used


TORCHVISION_OPS = torchvision_ops.install()  # before mmdet / mmseg import mmcv.ops
REGISTERED = register_all()

__all__ = ["CONFIG_DIR", "REGISTERED", "TORCHVISION_OPS", "TARGET_IMG_SIZE", "config_path", "convert_to_openmmlab", "register_all"]
