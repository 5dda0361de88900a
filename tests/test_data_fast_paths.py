"""The loader's fast paths: the tar header walk (same members as tarfile, or it steps aside), and
uint8 batches from the workers normalised in the main process."""

import io
import itertools
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mimscale.data_pipeline.loader import PretrainLoader, _host_batch
from mimscale.data_pipeline.sources.wds import (
    TABLE_SUFFIX,
    NotPlain,
    PlainTar,
    TarShardSource,
    _read_samples,
    member_table,
    read_member_table,
    read_shard,
    to_record,
    write_member_table,
)
from mimscale.data_pipeline.synthetic import write_imagefolder, write_shards
from mimscale.data_pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD
from mimscale.data_pipeline.views import mae_views, normalize_uint8, normalize_uint8_on


def _tar(path, members, fmt=tarfile.PAX_FORMAT, mtime=0):
    """``members``: (name, bytes) for files, (name, 'dir') / (name, '->target') for others."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            if data == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data[2:]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _members(path, walker):
    if walker == "plain":
        tar = PlainTar(path)
        try:
            return [(m.name, m.offset_data, m.size) for m in tar]
        finally:
            tar.close()
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def _sample_members(n=5):
    rng = random.Random(0)
    out = []
    for i in range(n):
        out += [(f"s{i:03d}.jpg", rng.randbytes(rng.randint(0, 1500))), (f"s{i:03d}.cls", str(i).encode())]
    return out


LONG = "a/" + "deep_folder_name/" * 8 + "sample.with.dots"  # > 100 characters: ustar prefix or pax path
LAYOUTS = {
    "ustar": (tarfile.USTAR_FORMAT, 0, _sample_members()),
    "ustar_prefix": (tarfile.USTAR_FORMAT, 0, [(LONG + ".jpg", b"x" * 700), (LONG + ".cls", b"1")]),
    "pax_float_mtime": (tarfile.PAX_FORMAT, 1.5e9 + 0.25, _sample_members()),  # webdataset's writer
    "pax_long_unicode": (tarfile.PAX_FORMAT, 0, [("d/" + "é" * 120 + ".jpg", b"y" * 513),
                                                 ("d/" + "é" * 120 + ".cls", b"2"), ("zz.jpg", b"")]),
    "dirs_and_links": (tarfile.PAX_FORMAT, 0, [("d", "dir"), ("d/a.jpg", b"z" * 1024), ("d/a.txt", "->a.jpg"),
                                               ("d/b.jpg", b"w" * 10)]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_walk_finds_what_tarfile_finds(tmp_path, layout):
    fmt, mtime, members = LAYOUTS[layout]
    path = _tar(tmp_path / "t.tar", members, fmt, mtime)
    assert _members(path, "plain") == _members(path, "tarfile")
    assert len(_members(path, "plain")) == sum(not isinstance(d, str) for _, d in members)


def test_walk_steps_aside_for_what_it_does_not_read(tmp_path):
    gnu = _tar(tmp_path / "gnu.tar", [(LONG + "/x" * 20 + ".jpg", b"q" * 100)], tarfile.GNU_FORMAT)
    good = _tar(tmp_path / "good.tar", _sample_members())
    raw = bytearray(Path(good).read_bytes())
    damaged = tmp_path / "damaged.tar"
    second = _members(good, "tarfile")[1][1] - 512  # the second member's header
    raw[second + 3] ^= 0xFF  # a byte of its name: the checksum no longer matches
    damaged.write_bytes(bytes(raw))
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(bytes(raw[:3000]))
    for path in (gnu, damaged, truncated):
        with pytest.raises(NotPlain):
            _members(str(path), "plain")


def test_read_shard_equals_the_tarfile_read(tmp_path, monkeypatch):
    """Whichever walk reads it, a shard gives the same samples and the same errors."""
    good = _tar(tmp_path / "good.tar", _sample_members(8), mtime=1.7e9 + 0.5)
    raw = Path(good).read_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[: len(raw) // 2])
    _tar(tmp_path / "gnu.tar", _sample_members(8) + [(LONG + ".jpg", b"v")], tarfile.GNU_FORMAT)
    for name in ("good.tar", "cut.tar", "gnu.tar"):
        url = str(tmp_path / name)
        for wanted in ({0, 3, 7}, {5}, set(range(9))):
            assert read_shard(url, wanted) == _read_samples(url, wanted, quick=False), (name, wanted)
    monkeypatch.setattr(tarfile, "open", None)  # a plain shard is read without tarfile
    samples = read_shard(good, {2, 7})
    assert samples[2]["key"] == "s002" and samples[2]["members"]["cls"] == b"2" and len(samples) == 2


def test_host_batch_is_fresh_float_memory():
    for shape in [(2, 3, 4, 4), (8, 3, 224, 224)]:  # below and above a huge page
        a, b = _host_batch(shape), _host_batch(shape)
        assert a.shape == shape and a.dtype == torch.float32 and a.is_contiguous()
        a.fill_(1.0)
        b.fill_(2.0)
        assert a.data_ptr() != b.data_ptr() and float(a.sum()) == a.numel()


def test_normalize_batch_equals_the_equation():
    x = torch.randint(0, 256, (3, 3, 5, 7), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (x.double() / 255 - mean.double()) / std.double()
    for src in (x, x.contiguous(memory_format=torch.channels_last), list(x)):
        assert torch.allclose(normalize_uint8(src).double(), expected, atol=1e-5)
    out = _host_batch(x.shape)
    assert normalize_uint8(x, out) is out
    # the device path (a GPU in training) does the host's operations in its order: the same floats
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert torch.equal(normalize_uint8_on(x, device).cpu(), normalize_uint8(x))


def test_loader_delivers_batches_on_its_device(tmp_path):
    """Batches arrive normalised on the loader's device, equal to the host's normalisation."""
    from mimscale.data_pipeline.sources.imagefolder import ImageFolderSource

    root = write_imagefolder(tmp_path / "imgs", 8, size=40)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    host, there = (PretrainLoader(ImageFolderSource(root), mae_views(32), 4, device=d)
                   for d in ("cpu", device))
    a, b = next(iter(host)), next(iter(there))
    assert b["images"].device.type == device.type and b["images"].dtype == torch.float32
    assert torch.equal(a["images"], b["images"].cpu()) and torch.equal(a["index"], b["index"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return str(write_shards(tmp_path_factory.mktemp("fast") / "wds", 24, size=40, max_count=8, progress=False))


def test_worker_batches_equal_in_process_batches(shards):
    """uint8 views through shared memory, normalised in the main process: per sample, the same
    floats and boxes as a loader without workers (an epoch of 24 samples, 6 batches of 4)."""
    def epoch(workers):
        ld = PretrainLoader(TarShardSource(shards), mae_views(32), batch_size=4, seed=3, num_workers=workers)
        out = {}
        for b in itertools.islice(iter(ld), 6):
            assert b["images"].dtype == torch.float32 and "views" not in b and b["epoch"] == 0
            out.update({int(i): (x, box) for i, x, box in zip(b["index"], b["images"], b["boxes"])})
        return out

    inline, workers = epoch(0), epoch(2)
    assert sorted(inline) == sorted(workers) == list(range(24))
    for i, (x, box) in inline.items():
        assert torch.equal(x, workers[i][0]) and torch.equal(box, workers[i][1])
    # and the floats are the normalised uint8 view, not something else
    x = torch.stack([x for x, _ in inline.values()])
    pixels = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255 + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    assert (pixels - pixels.round()).abs().max() < 1e-3 and pixels.min() > -0.5 and pixels.max() < 255.5
    assert np.unique(pixels.round().numpy()).size > 50


TABLE_LAYOUTS = {  # members per sample in odd orders: no image, zero-byte image, bad label, two images
    **{k: v for k, v in LAYOUTS.items() if k != "dirs_and_links"},
    "ragged": (tarfile.PAX_FORMAT, 0, [("a.cls", b"3"), ("a.JPG", b"j" * 900), ("b.json", b"{}"),
                                       ("b.cls", b"x"), ("c.png", b""), ("c.cls", b"5"),
                                       ("d.png", b"p" * 20), ("d.jpg", b"k" * 30), ("d.label", b" 7\n")]),
}


@pytest.mark.parametrize("layout", sorted(TABLE_LAYOUTS))
def test_member_table_reads_what_the_walk_reads(tmp_path, layout):
    fmt, mtime, members = TABLE_LAYOUTS[layout]
    url = _tar(tmp_path / "t.tar", members, fmt, mtime)
    n = len(member_table(url)["samples"])
    wanted_sets = [set(range(n)), {n - 1}, {0, n + 2}]  # n + 2: beyond the shard
    walked = [read_shard(url, w) for w in wanted_sets]
    write_member_table(url)
    assert read_member_table(url) is not None
    for w, expected in zip(wanted_sets, walked):
        got = read_shard(url, w)
        assert [to_record(i, url, got[i]).__dict__ for i in sorted(w)] == \
               [to_record(i, url, expected[i]).__dict__ for i in sorted(w)], (layout, w)


def test_a_table_that_does_not_describe_its_shard_is_not_trusted(tmp_path, monkeypatch):
    url = _tar(tmp_path / "t.tar", _sample_members(6))
    write_member_table(url)
    table = Path(url + TABLE_SUFFIX).read_text()
    # the same size, other names (a rewritten shard): the header check sends the read to the walk
    _tar(tmp_path / "t.tar", [(n.replace("s", "r"), d) for n, d in _sample_members(6)])
    Path(url + TABLE_SUFFIX).write_text(table)
    assert read_member_table(url) is not None
    assert read_shard(url, {1, 4}) == _read_samples(url, {1, 4}, quick=False)
    assert read_shard(url, {1})[1]["key"] == "r001"
    # more samples than the table knows, at the same size (tars grow by 10 KiB records)
    _tar(tmp_path / "t.tar", _sample_members(7))
    Path(url + TABLE_SUFFIX).write_text(table)
    assert read_member_table(url) is not None  # the size matches
    assert read_shard(url, {6})[6]["key"] == "s006"
    # another size: the table is ignored outright
    _tar(tmp_path / "t.tar", _sample_members(40))
    assert read_member_table(url) is None
    Path(url + TABLE_SUFFIX).write_text("{not json")
    assert read_member_table(url) is None and read_shard(url, {39})[39]["key"] == "s039"


def test_writers_leave_tables_that_readers_use(shards, tmp_path, monkeypatch):
    from mimscale.data_pipeline.shards.wds_writer import index_shards

    tars = sorted(Path(shards).parent.glob("*.tar"))
    assert tars and all(Path(str(t) + TABLE_SUFFIX).is_file() for t in tars)
    calls = []
    monkeypatch.setattr("mimscale.data_pipeline.sources.wds.PlainTar",
                        lambda *a: calls.append(a) or pytest.fail("walked a shard that has a table"))
    records = list(TarShardSource(shards).read(np.arange(24)))
    assert [r.error for r in records] == [None] * 24 and not calls
    monkeypatch.undo()
    copy = tmp_path / "copy.tar"
    copy.write_bytes(tars[0].read_bytes())
    index_shards([str(copy)], tmp_path / "index.json")
    assert read_member_table(str(copy)) == read_member_table(str(tars[0]))
