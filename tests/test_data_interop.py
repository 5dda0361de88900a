"""Compressed shards, and shards exchanged with the ``webdataset`` and ``wids`` packages both ways."""

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from extras import need
from PIL import Image

from mimscale.cli import main
from mimscale.data_pipeline.loader import PretrainLoader
from mimscale.data_pipeline.shards import ImageFolderInput, write_wds
from mimscale.data_pipeline.sources.wds import TarShardSource, count_samples, read_index, read_shard
from mimscale.data_pipeline.synthetic import write_imagefolder
from mimscale.data_pipeline.views import mae_views
from mimscale.errors import DataError

N = 9


def pixels(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8)


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels(i)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path, mode: str = "w") -> str:
    """``N`` samples ``dir/sNN`` (png, cls, json) with Python's tarfile; ``mode`` picks compression."""
    with tarfile.open(path, mode) as tar:
        for i in range(N):
            for ext, data in (("cls", str(i % 4).encode()), ("json", b"{}"), ("png", png(i))):
                info = tarfile.TarInfo(f"dir/s{i:02d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def contents(src: TarShardSource, ids=None) -> list[tuple[int, str, int, bytes]]:
    ids = np.arange(len(src)) if ids is None else np.asarray(ids)
    out = []
    for rec in src.read(ids):
        assert rec.error is None, rec.error
        out.append((rec.id, rec.key, rec.label, rec.data))
    return out


def expected(ids=range(N)):
    return [(i, f"dir/s{i:02d}", i % 4, png(i)) for i in ids]


def first_epoch(src, world_size=1, rank=0, workers=0):
    ld = PretrainLoader(src, mae_views(8), batch_size=2, world_size=world_size, rank=rank,
                        num_workers=workers, max_bad_fraction=0)
    return [b for _, b in zip(range(ld.steps_per_epoch), ld)]


# --------------------------------------------------------------------------- compressed shards

@pytest.mark.parametrize("name,mode", [("a.tar.gz", "w:gz"), ("a.tgz", "w:gz"), ("a.tar.bz2", "w:bz2"),
                                       ("a.tar.xz", "w:xz"), ("gzipped-but-named.tar", "w:gz")])
def test_compressed_shards_read_like_plain_ones(tmp_path, name, mode):
    url = write_tar(tmp_path / name, mode)
    assert count_samples(url) == N
    src = TarShardSource(url)
    assert src.shard_sizes == [N] and contents(src) == expected()
    assert contents(src, [7, 2, 3]) == expected([7, 2, 3])  # a subset, in the order asked


def test_compressed_shards_keep_exactly_once_and_resume(tmp_path):
    plain = TarShardSource([write_tar(tmp_path / f"p{k}.tar") for k in range(2)])
    packed = TarShardSource([write_tar(tmp_path / f"c{k}.tar.gz", "w:gz") for k in range(2)])
    for rank in (0, 1):  # the same ids and pixels as from plain shards, on each of 2 ranks
        a, b = first_epoch(plain, 2, rank, workers=2), first_epoch(packed, 2, rank, workers=2)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x["index"], y["index"]) and torch.equal(x["images"], y["images"])
    ld = PretrainLoader(packed, mae_views(8), batch_size=2, max_bad_fraction=0)
    it = iter(ld)
    next(it)
    state, rest = ld.state_dict(), [next(it) for _ in range(3)]
    again = PretrainLoader(packed, mae_views(8), batch_size=2, max_bad_fraction=0)
    again.load_state_dict(state)
    for x, y in zip(rest, iter(again)):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["images"], y["images"])


def test_compressed_shards_index_and_pipe(tmp_path):
    url = write_tar(tmp_path / "a.tar.gz", "w:gz")
    assert main(["shards", "index", url, "--out", str(tmp_path / "index.json")]) == 0
    assert read_index(tmp_path / "index.json")[1] == [N]
    assert not os.path.exists(url + ".members.json")  # offsets in a compressed stream cannot be sought
    assert contents(TarShardSource(str(tmp_path / "index.json"))) == expected()
    piped = TarShardSource(f"pipe:cat {url}", allow_pipe=True)
    assert piped.shard_sizes == [N] and contents(piped, [1, 8]) == expected([1, 8])


def test_damaged_compressed_shards_are_bad_samples_not_tracebacks(tmp_path, caplog):
    data = Path(write_tar(tmp_path / "whole.tar.gz", "w:gz")).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with caplog.at_level(logging.WARNING, "mimscale.data"):
        readable = count_samples(str(cut))
    assert 0 < readable < N and "is damaged after" in caplog.text
    samples = read_shard(str(cut), set(range(N)))
    assert all("error" in samples[i] for i in range(readable + 1, N))
    mangled = bytearray(data)
    mangled[10:40] = b"\xff" * 30  # the first deflate block: zlib refuses it
    bad = tmp_path / "mangled.tar.gz"
    bad.write_bytes(bytes(mangled))
    samples = read_shard(str(bad), {0, 1})
    assert all("damaged shard" in s["error"] for s in samples.values())
    with pytest.raises(DataError, match=r"shard .*mangled\.tar\.gz is not a tar file"):
        TarShardSource(str(bad))


# --------------------------------------------------------------------------- the webdataset package

def pil_sample(i: int) -> dict:
    return {"__key__": f"s{i:04d}", "png": Image.fromarray(pixels(i)), "cls": i % 4, "json": {"i": i}}


def assert_reads_webdataset_samples(src: TarShardSource, n: int):
    seen = {}
    for rec in src.read(np.arange(len(src))):
        assert rec.error is None, rec.error
        i = int(rec.key[1:])
        with Image.open(io.BytesIO(rec.data)) as im:
            assert (np.asarray(im.convert("RGB")) == pixels(i)).all()
        seen[i] = rec.label
    assert seen == {i: i % 4 for i in range(n)}


def test_mimscale_reads_shards_the_webdataset_package_writes(tmp_path):
    wds = need("webdataset")
    pattern = str(tmp_path / "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=4, verbose=0) as sink:
        for i in range(10):
            sink.write(pil_sample(i))
    urls = str(tmp_path / "wds-{000000..000002}.tar")
    assert_reads_webdataset_samples(TarShardSource(urls), 10)  # no index: headers counted at start
    index = str(tmp_path / "index.json")
    assert main(["shards", "index", urls, "--out", index]) == 0  # index + member tables
    assert read_index(index)[1] == [4, 4, 2] and os.path.exists(str(tmp_path / "wds-000000.tar.members.json"))
    src = TarShardSource(index)
    assert_reads_webdataset_samples(src, 10)
    ids = torch.cat([b["index"] for b in first_epoch(src)])
    assert sorted(ids.tolist()) == list(range(10))  # batch 2: every sample once
    with wds.TarWriter(str(tmp_path / "packed.tar.gz")) as sink:  # compressed by its name
        for i in range(5):
            sink.write(pil_sample(i))
    assert_reads_webdataset_samples(TarShardSource(str(tmp_path / "packed.tar.gz")), 5)


def test_the_webdataset_package_reads_shards_mimscale_writes(tmp_path):
    wds = need("webdataset")
    folder = write_imagefolder(tmp_path / "if", 12, size=16)
    out = tmp_path / "shards"
    index = write_wds(ImageFolderInput(folder), out, max_count=5, progress=False)
    urls, counts = read_index(index)
    assert counts == [5, 5, 2]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
    seen = []
    for sample in dataset:
        meta = sample["json"]
        with Image.open(folder / meta["path"]) as im:
            original = np.asarray(im.convert("RGB"))
        assert (np.asarray(sample["png"]) == original).all()
        assert sample["cls"] == ImageFolderInput(folder).source.class_to_idx[meta["path"].split("/")[0]]
        seen.append(sample["__key__"])
    assert seen == [f"{i:08d}" for i in range(12)]  # the write positions, in order
    assert json.loads(index.read_text())["shardlist"][0]["url"] == "shard-000000.tar"


@pytest.mark.filterwarnings("ignore:String specifications for transformations are deprecated")
def test_the_wids_package_reads_the_index_mimscale_writes(tmp_path):
    wids = need("wids")  # webdataset's indexed reader, a package of its own since webdataset 1.0
    folder = write_imagefolder(tmp_path / "if", 7, size=16)
    index = write_wds(ImageFolderInput(folder), tmp_path / "shards", max_count=3, progress=False)
    dataset = wids.ShardListDataset(str(index), cache_dir=str(tmp_path / "cache"))
    labels = ImageFolderInput(folder).source.class_to_idx
    assert len(dataset) == 7
    for i in range(7):
        sample = dataset[i]
        meta = sample[".json"]
        with Image.open(folder / meta["path"]) as im:
            assert (np.asarray(sample[".png"].convert("RGB")) == np.asarray(im.convert("RGB"))).all()
        assert sample[".cls"] == labels[meta["path"].split("/")[0]] and sample["__key__"] == f"{i:08d}"
