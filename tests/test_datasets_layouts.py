"""Every data-set reader on a tiny fake copy of its official on-disk layout, written here."""

import json
import os

import numpy as np
import pytest
from classify_data import write_cifar
from extras import need
from PIL import Image

from mimscale.downstream.classify.datasets import DatasetLayoutError, build_dataset


def _img(path, value=0, size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_imagenet_imagefolder(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for c in ("n01", "n02"):
            for i in range(n):
                _img(tmp_path / split / c / f"{c}_{i}.JPEG", 10 * i)
    train = build_dataset("imagenet", tmp_path, "train")
    val = build_dataset("imagenet", tmp_path, "val")
    assert train.classes == val.classes == ["n01", "n02"]
    assert len(train) == 6 and len(val) == 4 and val.labels == [0, 0, 1, 1]
    image, label = val[2]
    assert image.mode == "RGB" and image.size == (6, 5) and label == 1
    assert val.keys[2] == "val/n02/n02_0.JPEG"
    (tmp_path / "val" / "n03").mkdir()
    _img(tmp_path / "val" / "n03" / "x.JPEG")
    with pytest.raises(DatasetLayoutError, match="class folders that 'train/' lacks"):
        build_dataset("imagenet", tmp_path, "val")
    with pytest.raises(DatasetLayoutError, match=r"'train' is missing[\s\S]*expected layout"):
        build_dataset("imagenet", tmp_path / "val", "val")
    with pytest.raises(ValueError, match="valid: train, val"):
        build_dataset("imagenet", tmp_path, "test")


def _imagenet_train(root):
    for c in ("n01", "n02"):
        _img(root / "train" / c / f"{c}_0.JPEG")


def test_imagenet_flat_val_with_the_devkit(tmp_path):
    """val/ as distributed (one folder), labelled by the devkit's ground truth and meta.mat."""
    need("scipy")
    from scipy.io import savemat
    _imagenet_train(tmp_path)
    for n in (1, 2, 3):
        _img(tmp_path / "val" / f"ILSVRC2012_val_{n:08d}.JPEG", 40 * n)
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n1\n2\n")
    synsets = np.zeros(3, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    synsets[:] = [(1, "n02", 0), (2, "n01", 0), (1001, "n99", 2)]  # ids are not the class order
    savemat(data / "meta.mat", {"synsets": synsets})
    val = build_dataset("imagenet", tmp_path, "val")
    assert val.classes == ["n01", "n02"] and val.labels == [0, 1, 0]
    assert val.keys == [f"val/ILSVRC2012_val_{n:08d}.JPEG" for n in (1, 2, 3)]
    assert val[1][0].size == (6, 5)


def test_imagenet_flat_val_with_kaggles_solution_file(tmp_path):
    root = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"  # Kaggle's archive; the csv sits at its top
    _imagenet_train(root)
    for stem in ("ILSVRC2012_val_00000007", "ILSVRC2012_val_00000009"):
        _img(root / "val" / f"{stem}.JPEG")
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000009,n01 1 2 3 4 n01 5 6 7 8\n"
        "ILSVRC2012_val_00000007,n02 0 0 9 9\n")
    val = build_dataset("imagenet", root, "val")
    assert val.keys == ["val/ILSVRC2012_val_00000007.JPEG", "val/ILSVRC2012_val_00000009.JPEG"]
    assert val.labels == [1, 0]
    _img(root / "val" / "ILSVRC2012_val_00000011.JPEG")
    with pytest.raises(DatasetLayoutError, match=r"1 image\(s\) of 'val/' have no label"):
        build_dataset("imagenet", root, "val")
    (tmp_path / "LOC_val_solution.csv").unlink()
    with pytest.raises(DatasetLayoutError, match="no labels for them were found"):
        build_dataset("imagenet", root, "val")
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000007,n05 1 1 2 2\n"
                                               "ILSVRC2012_val_00000009,n01 1 1 2 2\n"
                                               "ILSVRC2012_val_00000011,n01 1 1 2 2\n")
    with pytest.raises(DatasetLayoutError, match=r"classes that 'train/' lacks: \['n05'\]"):
        build_dataset("imagenet", root, "val")


@pytest.mark.parametrize("year", [2018, 2019])
def test_inaturalist_json(tmp_path, year):
    images, anns = [], []
    for i, cat in enumerate([0, 2, 2, 1]):
        rel = f"train_val{year}/Plantae/{cat}/{i:03d}.jpg"
        _img(tmp_path / rel, i)
        images.append({"id": 100 + i, "file_name": rel, "width": 6, "height": 5})
        anns.append({"id": i, "image_id": 100 + i, "category_id": cat})
    cats = [{"id": c, "name": f"species{c}"} for c in (0, 1, 2)]
    (tmp_path / f"train{year}.json").write_text(json.dumps({"images": images[:3], "annotations": anns[:3],
                                                            "categories": cats}))
    (tmp_path / f"val{year}.json").write_text(json.dumps({"images": images[3:], "annotations": anns[3:],
                                                          "categories": cats}))
    train = build_dataset(f"inat{year}", tmp_path, "train")
    val = build_dataset(f"inat{year}", tmp_path, "val")
    assert train.labels == [0, 2, 2] and val.labels == [1]
    assert train.classes == ["species0", "species1", "species2"]
    assert np.asarray(val[0][0]).max() == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match=f"'train{year}.json' is missing"):
        build_dataset(f"inat{year}", tmp_path / "empty", "train")
    with pytest.raises(DatasetLayoutError, match="the folder does not exist"):
        build_dataset(f"inat{year}", tmp_path / "nowhere", "train")


def test_flowers102_mat(tmp_path):
    need("scipy")
    from scipy.io import savemat

    labels = np.array([[1, 2, 3, 1, 2, 3, 102]])
    for i in range(1, 8):
        _img(tmp_path / "jpg" / f"image_{i:05d}.jpg", i)
    savemat(tmp_path / "imagelabels.mat", {"labels": labels})
    savemat(tmp_path / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3]]),
                                     "tstid": np.array([[4, 5, 6, 7]])})
    assert build_dataset("flowers102", tmp_path, "train").labels == [0, 1]
    trainval = build_dataset("flowers102", tmp_path, "trainval")
    assert trainval.keys == ["jpg/image_00001.jpg", "jpg/image_00002.jpg", "jpg/image_00003.jpg"]
    test = build_dataset("flowers102", tmp_path, "test")
    assert test.labels == [0, 1, 2, 101] and test.num_classes == 102
    os.remove(tmp_path / "jpg" / "image_00005.jpg")
    with pytest.raises(DatasetLayoutError, match="image_00005.jpg' is missing"):
        build_dataset("flowers102", tmp_path, "test")
    os.remove(tmp_path / "setid.mat")
    with pytest.raises(DatasetLayoutError, match="'setid.mat' is missing"):
        build_dataset("flowers102", tmp_path, "test")


def test_cub200_text_files(tmp_path):
    root = tmp_path / "CUB_200_2011"  # as the archive unpacks
    rows = [(1, "001.Albatross/a1.jpg", 1, 1), (2, "001.Albatross/a2.jpg", 1, 0),
            (3, "002.Auklet/b1.jpg", 2, 1), (4, "002.Auklet/b2.jpg", 2, 0)]
    for _, rel, _, _ in rows:
        _img(root / "images" / rel)
    (root / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (root / "classes.txt").write_text("1 001.Albatross\n2 002.Auklet\n")
    train, test = build_dataset("cub200", root, "train"), build_dataset("cub200", root, "test")
    assert train.keys == ["images/001.Albatross/a1.jpg", "images/002.Auklet/b1.jpg"] and train.labels == [0, 1]
    assert test.labels == [0, 1] and test.classes == ["001.Albatross", "002.Auklet"]
    assert build_dataset("cub200", tmp_path, "train").keys == train.keys  # the archive's parent works too
    (root / "image_class_labels.txt").write_text("1 1 extra\n")
    with pytest.raises(DatasetLayoutError, match="image_class_labels.txt line 1 has 3 fields"):
        build_dataset("cub200", root, "train")


def test_stanford_dogs_mat(tmp_path):
    need("scipy")
    from scipy.io import savemat

    files = {"train": [("n02085620-Chihuahua/c1.jpg", 1), ("n02085782-Japanese_spaniel/j1.jpg", 2)],
             "test": [("n02085782-Japanese_spaniel/j2.jpg", 2)]}
    for split, items in files.items():
        for rel, _ in items:
            _img(tmp_path / "Images" / rel)
        cell = np.empty((len(items), 1), dtype=object)
        for i, (rel, _) in enumerate(items):
            cell[i, 0] = np.array([rel])
        savemat(tmp_path / f"{split}_list.mat", {"file_list": cell, "annotation_list": cell,
                                                 "labels": np.array([[y] for _, y in items], float)})
    train = build_dataset("stanford_dogs", tmp_path, "train")
    assert train.labels == [0, 1] and train.classes == ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    assert build_dataset("stanford_dogs", tmp_path, "test").keys == ["Images/n02085782-Japanese_spaniel/j2.jpg"]
    savemat(tmp_path / "test_list.mat", {"file_list": np.array([[np.array(["n02085620-Chihuahua/c1.jpg"])]],
                                                               dtype=object), "labels": np.array([[2.0]])})
    with pytest.raises(DatasetLayoutError, match="puts n02085620-Chihuahua/c1.jpg in class 2"):
        build_dataset("stanford_dogs", tmp_path, "test")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, name):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    y = np.arange(12) % 3
    write_cifar(tmp_path, name, (x[:10], y[:10]), (x[10:], y[10:]), ["a", "b", "c"])
    train, test = build_dataset(name, tmp_path, "train"), build_dataset(name, tmp_path, "test")
    assert len(train) == 10 and len(test) == 2 and train.classes == ["a", "b", "c"]
    image, label = train[7]
    assert label == 1 and np.array_equal(np.asarray(image), x[7])  # channel planes back to HWC exactly
    assert test.keys == ["test/0", "test/1"]
    folder = tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    assert build_dataset(name, folder, "test").labels == test.labels  # the batches folder itself works too
    os.remove(folder / ("test_batch" if name == "cifar10" else "test"))
    with pytest.raises(DatasetLayoutError, match="is missing[\\s\\S]*python pickles"):
        build_dataset(name, tmp_path, "test")


def test_dtd_folds(tmp_path):
    for c in ("banded", "zigzagged"):
        for i in range(3):
            _img(tmp_path / "images" / c / f"{c}_{i}.jpg")
    (tmp_path / "labels").mkdir()
    for fold in (1, 2):
        (tmp_path / "labels" / f"train{fold}.txt").write_text(f"banded/banded_{fold - 1}.jpg\nzigzagged/zigzagged_0.jpg\n")
        (tmp_path / "labels" / f"val{fold}.txt").write_text("banded/banded_2.jpg\n")
        (tmp_path / "labels" / f"test{fold}.txt").write_text("zigzagged/zigzagged_1.jpg\nzigzagged/zigzagged_2.jpg\n")
    assert build_dataset("dtd", tmp_path, "trainval").labels == [0, 1, 0]
    assert build_dataset("dtd", tmp_path, "train", fold=2).keys[0] == "images/banded/banded_1.jpg"
    assert build_dataset("dtd", tmp_path, "test").labels == [1, 1]
    with pytest.raises(DatasetLayoutError, match="labels/test3.txt' is missing"):
        build_dataset("dtd", tmp_path, "test", fold=3)
    parent = tmp_path.parent / f"{tmp_path.name}_parent"  # the archive unpacks into dtd/
    parent.mkdir()
    os.symlink(tmp_path, parent / "dtd")
    assert build_dataset("dtd", parent, "test").keys == build_dataset("dtd", tmp_path, "test").keys


def test_tinyimagenet(tmp_path):
    root = tmp_path / "tiny-imagenet-200"  # as the archive unpacks; the parent is given below
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("n02\nn01\n")
    for w in ("n01", "n02"):
        for i in range(2):
            _img(root / "train" / w / "images" / f"{w}_{i}.JPEG")
    for i in range(3):
        _img(root / "val" / "images" / f"val_{i}.JPEG")
    (root / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn02\t0\t0\t5\t5\nval_1.JPEG\tn01\t1\t1\t4\t4\nval_2.JPEG\tn02\t0\t0\t3\t3\n")
    train, val = build_dataset("tinyimagenet", tmp_path, "train"), build_dataset("tinyimagenet", tmp_path, "val")
    assert train.classes == ["n01", "n02"] and train.labels == [0, 0, 1, 1]
    assert val.labels == [1, 0, 1] and val.keys[0] == "val/images/val_0.JPEG"
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t5\t5\n")
    with pytest.raises(DatasetLayoutError, match="line 1 does not name a file and a wnid"):
        build_dataset("tinyimagenet", root, "val")
    with pytest.raises(DatasetLayoutError, match=r"'wnids.txt' is missing[\s\S]*val_annotations.txt"):
        build_dataset("tinyimagenet", root / "train", "val")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown data set 'mnist'; valid: imagenet"):
        build_dataset("mnist", ".", "train")
