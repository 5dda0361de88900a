"""Generated dense data: COCO instances (polygons, RLE, compressed RLE) and ADE20K label PNGs
carry the objects' exact masks."""

import json

import numpy as np
import pytest
from extras import need
from PIL import Image

from mimscale.data_pipeline.synthetic import CLASSES, sample_at
from mimscale.data_pipeline.writers import (
    ADE_CLASSES,
    mask_to_polygons,
    write_ade20k,
    write_coco,
)


def _rasterize(polygons, h, w):
    mask_utils = need("pycocotools.mask")
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))).astype(bool)


def test_polygons_outline_masks_exactly_or_refuse_holes():
    rng = np.random.default_rng(0)
    for _ in range(100):
        m = rng.random((11, 13)) < 0.45  # many diagonal touches and holes
        polys = mask_to_polygons(m)
        if polys is not None:
            assert np.array_equal(_rasterize(polys, *m.shape), m)
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False
    assert mask_to_polygons(ring) is None
    square = np.zeros((6, 7), bool)
    square[1:4, 2:5] = True
    assert mask_to_polygons(square) == [[2.0, 1.0, 5.0, 1.0, 5.0, 4.0, 2.0, 4.0]]


@pytest.mark.parametrize("fmt", ["polygon", "rle", "compressed_rle"])
def test_coco_writer_round_trips_every_mask_box_and_class(tmp_path, fmt):
    coco_mod = need("pycocotools.coco")
    ann = write_coco(tmp_path, "val2017", num_images=12, size=48, seed=5, mask_format=fmt)
    assert ann == tmp_path / "annotations" / "instances_val2017.json"
    coco = coco_mod.COCO(str(ann))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    for i in range(12):
        sample = sample_at(5, i, size=48)
        info = coco.loadImgs(i + 1)[0]
        assert np.array_equal(np.asarray(Image.open(tmp_path / "val2017" / info["file_name"])), sample.image)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=i + 1))
        assert len(anns) == len(sample.objects)
        for a, obj in zip(anns, sample.objects):
            assert np.array_equal(coco.annToMask(a).astype(bool), obj.mask)
            x0, y0, x1, y1 = obj.box
            assert a["bbox"] == [x0, y0, x1 - x0, y1 - y0] and a["area"] == obj.area
            assert a["category_id"] == obj.class_id + 1 and a["iscrowd"] == 0
            kind = "polygon" if isinstance(a["segmentation"], list) else (
                "rle" if isinstance(a["segmentation"]["counts"], list) else "compressed_rle")
            assert kind == fmt or (fmt == "polygon" and kind == "rle" and obj.class_name == "ring")
    with pytest.raises(ValueError, match="valid: polygon, rle, compressed_rle"):
        write_coco(tmp_path, "x", 1, mask_format="png")


def test_ade_writer_labels_are_the_semantic_maps_shifted_for_reduce_zero_label(tmp_path):
    write_ade20k(tmp_path, "validation", num_images=4, size=40, seed=2)
    assert json.loads((tmp_path / "classes.json").read_text()) == list(ADE_CLASSES)
    for i in range(4):
        sample = sample_at(2, i, size=40)
        label = np.asarray(Image.open(tmp_path / "annotations" / "validation" / f"ADE_validation_{i:08d}.png"))
        assert label.dtype == np.uint8 and np.array_equal(label, sample.semantic_map() + 1)
        assert (tmp_path / "images" / "validation" / f"ADE_validation_{i:08d}.jpg").is_file()
    assert label.min() >= 1  # every pixel labelled: nothing falls into ADE's "other" (0)
