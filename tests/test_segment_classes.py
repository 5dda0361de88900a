"""Segmentation results name their classes: from the data folder's ``classes.json``, ADE20K's own
``objectInfo150.txt``, or the 150 ADE20K names shipped with mimscale."""

import csv
import json

import pytest

from mimscale.cli import main
from mimscale.downstream.segment.classes import label_names, read_object_info, shipped_ade20k_names
from mimscale.errors import DataError

# the release's format: a header, tab-separated fields, synonyms, stray spaces after some fields
OBJECT_INFO = ("Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n2\t0.1072\t6046\t612\tbuilding, edifice\n"
               "3 \t0.0231\t1906\t199\tbed \n")


def test_the_shipped_list_is_ade20ks_150_classes_in_label_order():
    names = shipped_ade20k_names()
    assert len(names) == len(set(names)) == 150
    assert (names[0], names[2], names[12], names[44], names[149]) == (
        "wall", "sky", "person", "chest of drawers", "flag")


def test_sources_in_order_and_the_class_count_must_match(tmp_path):
    assert label_names(tmp_path, 150) == shipped_ade20k_names()  # an ADE20K folder without the file
    assert label_names(tmp_path, 151, reduce_zero_label=False)[:2] == ["other", "wall"]
    assert label_names(tmp_path, 7) is None  # not ADE20K's count: no names rather than wrong ones
    (tmp_path / "objectInfo150.txt").write_text(OBJECT_INFO)
    assert read_object_info(tmp_path / "objectInfo150.txt") == ["wall", "building", "bed"]
    assert label_names(tmp_path, 3) == ["wall", "building", "bed"]
    assert label_names(tmp_path, 150) is None
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b"]))
    assert label_names(tmp_path, 2) == ["a", "b"]


def test_a_malformed_object_info_names_the_file(tmp_path):
    path = tmp_path / "objectInfo150.txt"
    path.write_text("Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\twall\n3\t0.1\t1\t1\tbed\n")
    with pytest.raises(DataError, match="objectInfo150.txt: the class indices are not 1..2"):
        read_object_info(path)
    path.write_text("wall\n")
    with pytest.raises(DataError, match="objectInfo150.txt: line 1"):
        read_object_info(path)


@pytest.fixture(scope="module")
def ade_without_names(tmp_path_factory):
    from mimscale.data_pipeline.writers import write_ade20k

    root = tmp_path_factory.mktemp("ade_plain")
    write_ade20k(root, "validation", num_images=2, size=32, seed=4)
    (root / "classes.json").unlink()  # as the real release: no classes.json
    return root


@pytest.mark.parametrize("object_info", [False, True])
def test_eval_json_and_the_per_class_table_name_ade20ks_classes(ade_without_names, tmp_path, object_info):
    root = ade_without_names
    if object_info:
        lines = [f"{k}\t0.1\t1\t1\tclass{k}, synonym" for k in range(1, 151)]
        (root / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n" + "\n".join(lines) + "\n")
    else:
        (root / "objectInfo150.txt").unlink(missing_ok=True)
    run = tmp_path / "seg"
    assert main(["segment", "eval_only=true", "backbone.name=mae_vit_tiny_patch16", "backbone.patch_size=8",
                 "backbone.pretrain_img_size=32", "model.channels=16", "model.aux_channels=8",
                 "model.pool_scales=[1,2]", "data.crop_size=32", "data.scale=[32,32]", "data.test_stride=32",
                 "engine.device=cpu", "engine.precision=fp32", "engine.num_workers=0", "engine.threads=1",
                 "output.progress=off", f"data.root={root}", f"output.dir={run}"]) == 0
    first = "class1" if object_info else "wall"
    m = json.loads((run / "eval.json").read_text())
    assert len(m["classes"]) == len(m["IoU"]) == 150 and m["classes"][0] == first
    rows = list(csv.DictReader((run / "per_class.csv").read_text().splitlines()))
    assert len(rows) == 150 and rows[0]["name"] == first and rows[149]["name"] == m["classes"][149]
    assert [r["IoU"] == "" for r in rows] == [v is None for v in m["IoU"]]
