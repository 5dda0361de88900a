"""Generated images written in the on-disk layouts of the dense benchmarks (COCO, ADE20K)."""

from .ade20k import ADE_CLASSES, ade_label, write_ade20k
from .coco import MASK_FORMATS, coco_categories, write_coco
from .polygons import mask_to_polygons

__all__ = ["ADE_CLASSES", "MASK_FORMATS", "ade_label", "coco_categories", "mask_to_polygons",
           "write_ade20k", "write_coco"]
