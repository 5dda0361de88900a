"""Synthetic generator: determinism, mask/box/map consistency, image-folder round trip, caching."""

import json

import numpy as np
import pytest
from PIL import Image

from mimscale.data_pipeline.synthetic import (
    CLASSES,
    MARKER,
    ensure_imagefolder,
    generate_dataset,
    generate_sample,
    load_objects,
    mask_to_rle,
    rle_to_mask,
    sample_at,
    write_imagefolder,
)


def _same(a, b):
    return np.array_equal(a.image, b.image) and len(a.objects) == len(b.objects) and all(
        x.class_id == y.class_id and x.box == y.box and np.array_equal(x.mask, y.mask)
        for x, y in zip(a.objects, b.objects))


def test_determinism_and_seed_dependence():
    a = list(generate_dataset(8, 48, seed=3))
    b = list(generate_dataset(8, 48, seed=3))
    c = list(generate_dataset(8, 48, seed=4))
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not any(np.array_equal(x.image, y.image) for x, y in zip(a, c))
    assert _same(sample_at(3, 5, 48), a[5])  # any sample regenerates from (seed, index) alone


@pytest.mark.parametrize("size", [32, 64])
def test_masks_boxes_maps(size):
    rng = np.random.default_rng(0)
    n_objs = []
    for _ in range(60):
        s = generate_sample(rng, size=size, max_objects=3)
        assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
        assert 1 <= len(s.objects) <= 3
        n_objs.append(len(s.objects))
        inst, sem = s.instance_map(), s.semantic_map()
        total = np.zeros((size, size), int)
        for i, o in enumerate(s.objects):
            assert o.mask.dtype == bool and o.mask.any()
            assert o.class_name == CLASSES[o.class_id]
            total += o.mask
            np.testing.assert_array_equal(inst == i + 1, o.mask)
            ys, xs = np.nonzero(o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # tight, exclusive
            assert 0.02 <= o.area / size**2 <= 0.45
        assert total.max() <= 1  # visible masks never overlap
        np.testing.assert_array_equal(sem > 0, inst > 0)
        for o in s.objects:
            assert (sem[o.mask] == o.class_id + 1).all()
        assert s.label == max(s.objects, key=lambda o: o.area).class_id
        # objects differ from the background they sit on
        bg = s.image[inst == 0].mean(0) if (inst == 0).any() else None
        if bg is not None:
            assert max(np.abs(s.image[o.mask].mean(0) - bg).max() for o in s.objects) > 20
    assert set(n_objs) == {1, 2, 3}


def test_rle_round_trip():
    rng = np.random.default_rng(1)
    for m in [rng.random((7, 5)) > 0.5, np.ones((4, 3), bool), np.zeros((3, 4), bool)]:
        np.testing.assert_array_equal(rle_to_mask(mask_to_rle(m)), m)
    assert mask_to_rle(np.array([[1, 0], [1, 1]], bool))["counts"] == [0, 2, 1, 1]


def test_write_and_load_round_trip(tmp_path):
    out = write_imagefolder(tmp_path, 12, size=32, seed=7, split="val")
    assert out == tmp_path / "val"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == list(CLASSES)
    assert json.loads((out / MARKER).read_text())["num_images"] == 12
    objs = load_objects(tmp_path, "val")
    assert len(objs) == 12
    for i, s in enumerate(generate_dataset(12, 32, seed=7)):
        rel = f"{CLASSES[s.label]}/{i:06d}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(out / rel)), s.image)
        got = objs[rel]
        assert len(got) == len(s.objects)
        for a, b in zip(got, s.objects):
            assert (a.class_id, a.class_name, a.box) == (b.class_id, b.class_name, b.box)
            np.testing.assert_array_equal(a.mask, b.mask)
    assert not list(tmp_path.glob(".val.*"))  # no temporary folders left behind


def test_ensure_imagefolder_caches(tmp_path):
    out = ensure_imagefolder(tmp_path, 6, size=32, seed=1)
    files = sorted(out.rglob("*.png"))
    mtimes = [p.stat().st_mtime_ns for p in files]
    assert ensure_imagefolder(tmp_path, 6, size=32, seed=1) == out
    assert [p.stat().st_mtime_ns for p in files] == mtimes  # untouched
    (out / MARKER).unlink()  # interrupted write -> regenerate
    ensure_imagefolder(tmp_path, 6, size=32, seed=1)
    assert (out / MARKER).exists()
    files2 = sorted(out.rglob("*.png"))
    assert [p.relative_to(out) for p in files2] == [p.relative_to(out) for p in files]
    assert all(p.stat().st_mtime_ns > m for p, m in zip(files2, mtimes))
    ensure_imagefolder(tmp_path, 4, size=32, seed=1)  # params differ -> rewritten, no stale files
    assert len(list(out.rglob("*.png"))) == 4


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_imagefolder(tmp_path, 2, size=32)
