"""Shard writers: size bounds, index counts, contents, re-encoding, resume, bad inputs, CLI."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from extras import need
from PIL import Image

from mimscale.cli import main
from mimscale.data_pipeline.shards import ImageFolderInput, SyntheticInput, write_beton, write_wds
from mimscale.data_pipeline.sources.imagefolder import ImageFolderSource
from mimscale.data_pipeline.sources.wds import count_samples, read_index
from mimscale.data_pipeline.synthetic import rle_to_mask, sample_at, write_imagefolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("if"), 20, size=24)


def samples_of(tar_path):
    out = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_shards_are_bounded_indexed_and_hold_the_inputs(folder, tmp_path):
    index = write_wds(ImageFolderInput(folder), tmp_path / "out", max_bytes=30 << 10, progress=False)
    urls, counts = read_index(index)
    assert len(urls) > 1 and sum(counts) == 20
    src = ImageFolderSource(folder)
    by_path = {os.path.relpath(p, folder): (p, label) for p, label in src.samples}
    seen = []
    for url, n in zip(urls, counts):
        assert os.path.getsize(url) <= 30 << 10 and count_samples(url) == n
        for members in samples_of(url).values():
            path, label = by_path[json.loads(members["json"])["path"]]
            assert members["png"] == Path(path).read_bytes()  # stored untouched
            assert int(members["cls"]) == label
            seen.append(path)
    assert sorted(seen) == sorted(by_path[k][0] for k in by_path)
    order = [json.loads(m["json"])["path"] for u in urls for m in samples_of(u).values()]
    assert order != sorted(order)  # shuffled: an ImageFolder is sorted by class


def test_reencoding_bounds_the_side_and_makes_jpegs(folder, tmp_path):
    index = write_wds(ImageFolderInput(folder), tmp_path / "out", max_side=16, quality=80, progress=False)
    for url in read_index(index)[0]:
        for members in samples_of(url).values():
            im = Image.open(io.BytesIO(members["jpg"]))
            assert im.format == "JPEG" and max(im.size) == 16


class Interrupted(ImageFolderInput):
    """Fails on its ``fail_at``-th load, like a job killed mid-way."""

    def __init__(self, root, fail_at):
        super().__init__(root)
        self.loads, self.fail_at = 0, fail_at

    def load(self, i):
        self.loads += 1
        if self.loads == self.fail_at:
            raise KeyboardInterrupt
        return super().load(i)


def test_an_interrupted_write_resumes_to_identical_shards(folder, tmp_path):
    opts = dict(max_bytes=30 << 10, progress=False)
    write_wds(ImageFolderInput(folder), tmp_path / "once", **opts)
    with pytest.raises(KeyboardInterrupt):
        write_wds(Interrupted(folder, fail_at=15), tmp_path / "resumed", **opts)
    state = json.loads((tmp_path / "resumed" / "index.json").read_text())["mimscale"]
    assert not state["complete"] and 0 < state["next_position"] < 15
    assert list((tmp_path / "resumed").glob("*.tar.tmp"))  # the unfinished shard, discarded on resume
    again = Interrupted(folder, fail_at=0)
    write_wds(again, tmp_path / "resumed", **opts)
    assert again.loads == 20 - state["next_position"]  # only what was not in a finished shard
    done = Interrupted(folder, fail_at=0)
    write_wds(done, tmp_path / "resumed", **opts)
    assert done.loads == 0  # complete: nothing to do
    names = sorted(p.name for p in (tmp_path / "once").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in names:
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    with pytest.raises(FileExistsError, match="different job.*--overwrite"):
        write_wds(ImageFolderInput(folder), tmp_path / "once", max_count=3, progress=False)
    write_wds(ImageFolderInput(folder), tmp_path / "once", max_count=3, progress=False, overwrite=True)
    assert read_index(tmp_path / "once" / "index.json")[1] == [3] * 6 + [2]


def test_bad_inputs_are_skipped_and_reported(tmp_path):
    root = write_imagefolder(tmp_path / "if", 8, size=24)
    src = ImageFolderSource(root)
    Path(src.path(3)).write_bytes(b"junk" * 10)
    Path(src.path(5)).write_bytes(b"")
    index = write_wds(ImageFolderInput(root), tmp_path / "out", progress=False, workers=2)
    doc = json.loads(index.read_text())
    assert sum(e["nsamples"] for e in doc["shardlist"]) == 6
    assert sorted(s["input"] for s in doc["mimscale"]["skipped"]) == sorted([src.path(3), src.path(5)])
    assert any("zero-byte" in s["error"] for s in doc["mimscale"]["skipped"])


def test_parallel_write_equals_serial(folder, tmp_path):
    for w in (0, 2):
        write_wds(ImageFolderInput(folder), tmp_path / f"w{w}", max_count=6, progress=False, workers=w)
    for p in (tmp_path / "w0").iterdir():
        if p.suffix == ".tar":
            assert p.read_bytes() == (tmp_path / "w2" / p.name).read_bytes()


def test_synthetic_generator_emits_straight_to_shards(tmp_path):
    index = write_wds(SyntheticInput(6, size=32, seed=2), tmp_path / "syn", progress=False)
    (url,), _ = read_index(index)
    for members in samples_of(url).values():
        meta = json.loads(members["json"])
        s = sample_at(2, meta["index"], size=32)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(members["png"]))), s.image)  # lossless
        assert int(members["cls"]) == s.label
        for obj, ref in zip(meta["objects"], s.objects):
            assert np.array_equal(rle_to_mask(obj["segmentation"]), ref.mask)


def test_beton_writer(folder, tmp_path):
    need("ffcv")
    from mimscale.data_pipeline.sources.beton import BetonSource

    root = write_imagefolder(tmp_path / "if", 9, size=40)
    src = ImageFolderSource(root)
    Path(src.path(2)).write_bytes(b"junk")
    out = write_beton(ImageFolderInput(root), tmp_path / "x.beton", max_side=32, progress=False)
    beton = BetonSource(out)
    sidecar = json.loads((tmp_path / "x.beton.json").read_text())
    assert len(beton) == sidecar["nsamples"] == 8 and sidecar["skipped"][0]["input"] == src.path(2)
    assert sorted(beton.labels.tolist()) == sorted(lab for i, (_, lab) in enumerate(src.samples) if i != 2)
    assert (beton.image["width"] == 32).all() and (beton.image["height"] == 32).all()
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_beton(ImageFolderInput(root), out, progress=False)


def test_cli_write_and_index(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["shards", "write", "--imagefolder", str(folder), str(out), "--max-count", "8",
                 "--no-progress"]) == 0
    assert read_index(out / "index.json")[1] == [8, 8, 4]
    assert main(["shards", "index", str(out / "shard-{000000..000002}.tar"), "--out", str(tmp_path / "i.json")]) == 0
    urls, counts = read_index(tmp_path / "i.json")
    assert counts == [8, 8, 4] and urls[0] == str(out / "shard-000000.tar")
    assert main(["shards", "write", "--synthetic", "5", "--synthetic-size", "16", str(tmp_path / "s"),
                 "--no-progress"]) == 0
    assert read_index(tmp_path / "s" / "index.json")[1] == [5]
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["shards", "write", "--imagefolder", str(folder), str(out), "--max-size", "12XB"])
    assert "'12XB' is not a size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["shards", "write", str(out)])  # no input named
    assert main(["shards", "write", "--imagefolder", str(tmp_path / "nope"), str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_writes_a_beton(folder, tmp_path):
    need("ffcv")
    assert main(["shards", "write", "--imagefolder", str(folder), str(tmp_path / "d.beton"), "--no-progress",
                 "--max-side", "16"]) == 0
    assert json.loads((tmp_path / "d.beton.json").read_text())["nsamples"] == 20
