"""Sources: URL patterns and start-up errors, the tar reader, .beton reading, data config keys."""

import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
from extras import need
from PIL import Image

from mimscale.config import ConfigError, load_config
from mimscale.data_pipeline.sources.imagefolder import ImageFolderSource
from mimscale.data_pipeline.sources.wds import (
    TarShardSource,
    count_samples,
    expand_braces,
    read_index,
    resolve_urls,
    split_key,
)
from mimscale.data_pipeline.synthetic import write_imagefolder, write_shards


def png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path, samples) -> str:
    """``samples``: ``[(key, {ext: bytes})]`` written in order, one member per ext."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_brace_expansion():
    assert expand_braces("s-{00..02}.tar") == ["s-00.tar", "s-01.tar", "s-02.tar"]
    assert expand_braces("s-{8..10}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar"]
    assert expand_braces("{a,b}/{0..1}") == ["a/0", "a/1", "b/0", "b/1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="empty"):
        expand_braces("s-{5..3}.tar")
    with pytest.raises(ValueError, match=r"cannot expand \{x\}"):
        expand_braces("s-{x}.tar")


def test_keys_group_members_like_webdataset():
    assert split_key("dir/n01.a.jpg") == ("dir/n01", "a.jpg")
    assert split_key("x.y/name.PNG") == ("x.y/name", "png")
    assert split_key("._hidden.jpg") is None and split_key("README") is None


def test_start_up_errors_name_what_is_wrong(tmp_path):
    write_tar(tmp_path / "s-0.tar", [("a", {"png": png(1)})])
    with pytest.raises(FileNotFoundError, match=r"shard .*s-1\.tar \(from .*s-\{0\.\.1\}\.tar'\) does not exist"):
        resolve_urls(str(tmp_path / "s-{0..1}.tar"))
    with pytest.raises(ValueError, match="data.urls is empty"):
        resolve_urls("  ")
    with pytest.raises(FileNotFoundError, match="matches no files"):
        resolve_urls(str(tmp_path / "*.tgz"))
    with pytest.raises(ValueError, match="set data.allow_pipe=true"):
        resolve_urls("pipe:cat x.tar")
    with pytest.raises(ValueError, match="unsupported scheme"):
        resolve_urls("s3://bucket/x.tar")
    with pytest.raises(FileNotFoundError, match="index .*nope.json does not exist"):
        resolve_urls(str(tmp_path / "nope.json"))
    write_tar(tmp_path / "empty.tar", [])
    with pytest.raises(ValueError, match="hold no samples"):
        TarShardSource(str(tmp_path / "empty.tar"))
    assert resolve_urls([str(tmp_path / "s-0.tar"), str(tmp_path / "*.tar")])[0][0].endswith("s-0.tar")


def test_reader_keeps_only_wanted_samples_in_the_asked_order(tmp_path):
    a = write_tar(tmp_path / "a.tar", [(f"k{i}", {"png": png(i), "cls": str(i % 3).encode()}) for i in range(5)])
    b = write_tar(tmp_path / "b.tar", [(f"m{i}", {"png": png(100 + i)}) for i in range(3)])
    src = TarShardSource([a, b])
    assert src.shard_sizes == [5, 3] and count_samples(a) == 5
    recs = list(src.read([6, 2, 0, 7, 4]))
    assert [(r.id, r.key, r.label) for r in recs] == [(6, "m1", -1), (2, "k2", 2), (0, "k0", 0),
                                                      (7, "m2", -1), (4, "k4", 1)]
    assert all(r.error is None and r.where in (a, b) for r in recs)
    assert np.asarray(Image.open(io.BytesIO(recs[0].data)))[0, 0, 0] == 101


def test_pipe_urls_stream_when_allowed(tmp_path):
    a = write_tar(tmp_path / "a.tar", [(f"k{i}", {"png": png(i)}) for i in range(4)])
    src = TarShardSource(f"pipe:cat {a}", allow_pipe=True)
    assert src.shard_sizes == [4]
    assert [r.key for r in src.read([3, 1])] == ["k3", "k1"]


def test_bad_samples_in_a_shard_are_records_with_errors(tmp_path):
    url = write_tar(tmp_path / "bad.tar", [
        ("ok", {"png": png(1)}), ("nokey", {"cls": b"1", "json": b"{}"}), ("empty", {"jpg": b""}),
        ("junk", {"jpg": b"not a jpeg at all"}), ("ok2", {"png": png(2)})])
    recs = {r.key: r for r in TarShardSource(url).read(range(5))}
    assert recs["nokey"].error.startswith("missing key: no image member") and "cls, json" in recs["nokey"].error
    assert recs["empty"].error == "zero-byte image member empty.jpg"
    assert recs["junk"].error is None  # undecodable: found by the decoder, not the reader
    assert recs["ok"].error is None and recs["ok2"].error is None
    assert recs["nokey"].describe() == f"{url} key nokey"


def test_truncated_shard(tmp_path):
    url = write_tar(tmp_path / "t.tar", [(f"k{i}", {"png": png(i, 64)}) for i in range(6)])
    full = TarShardSource(url)  # counted while intact (as an index would say)
    with open(url, "r+b") as f:
        f.truncate(os.path.getsize(url) // 2)
    recs = list(full.read(range(6)))
    good = [r for r in recs if r.error is None]
    assert 0 < len(good) < 6 and [r.id for r in good] == list(range(len(good)))
    assert all("truncated" in r.error or "damaged" in r.error for r in recs[len(good):])


def test_index_json_and_sibling_index(tmp_path):
    write_shards(tmp_path / "sh", 10, size=16, max_count=4, progress=False)
    urls, counts = read_index(tmp_path / "sh" / "index.json")
    assert counts == [4, 4, 2] and all(os.path.isfile(u) for u in urls)
    assert TarShardSource(str(tmp_path / "sh" / "index.json")).shard_sizes == [4, 4, 2]
    doc = json.loads((tmp_path / "sh" / "index.json").read_text())
    assert doc["__kind__"] == "wids-shard-index-v1" and doc["shardlist"][0]["url"] == "shard-000000.tar"
    # a pattern next to the index uses its counts (no scan) while file sizes match
    pattern = str(tmp_path / "sh" / "shard-{000000..000002}.tar")
    doc["shardlist"][2]["nsamples"] = 99  # a lie an up-to-date index would be trusted with
    (tmp_path / "sh" / "index.json").write_text(json.dumps(doc))
    assert TarShardSource(pattern).shard_sizes == [4, 4, 99]
    doc["shardlist"][2]["filesize"] += 1  # stale index: scanned instead
    (tmp_path / "sh" / "index.json").write_text(json.dumps(doc))
    assert TarShardSource(pattern).shard_sizes == [4, 4, 2]


def test_imagefolder_source_reads_bytes_and_flags_empty_files(tmp_path):
    root = write_imagefolder(tmp_path, 6, size=16)
    src = ImageFolderSource(root)
    open(src.path(2), "wb").close()
    recs = list(src.read([2, 0]))
    assert recs[0].error == "zero-byte file" and recs[0].key == os.path.relpath(src.path(2), root)
    assert recs[1].error is None and recs[1].data[:4] == b"\x89PNG" and recs[1].label == src.samples[0][1]


def test_beton_source(tmp_path):
    need("ffcv")
    from mimscale.data_pipeline.sources.beton import BetonSource

    path = write_shards(tmp_path / "s.beton", 12, size=24, fmt="beton", progress=False)
    src = BetonSource(path)
    recs = list(src.read([5, 0, 11]))
    assert len(src) == 12 and [r.id for r in recs] == [5, 0, 11]
    assert all(r.error is None and r.data[:2] == b"\xff\xd8" for r in recs)  # JPEG bytes
    assert Image.open(io.BytesIO(recs[0].data)).size == (24, 24)
    with pytest.raises(FileNotFoundError, match="missing.beton does not exist"):
        BetonSource(tmp_path / "missing.beton")
    (tmp_path / "junk.beton").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a readable .beton"):
        BetonSource(tmp_path / "junk.beton")


def test_missing_ffcv_says_how_to_install(monkeypatch, tmp_path):
    from mimscale.data_pipeline.sources.beton import BetonSource

    monkeypatch.setitem(sys.modules, "ffcv", None)
    monkeypatch.setitem(sys.modules, "ffcv.reader", None)
    with pytest.raises(ImportError, match=r"pip install 'mimscale\[ffcv\]'.*libturbojpeg0-dev"):
        BetonSource(tmp_path / "x.beton")


def test_data_config_keys():
    cfg = load_config(["data.source=wds", "data.urls=/d/train-{000000..000127}.tar", "data.remainder=pad"])
    assert cfg.data.urls == "/d/train-{000000..000127}.tar" and cfg.data.remainder == "pad"
    assert load_config(["data.source=wds", "data.urls=[/a.tar, /b.tar]"]).data.urls == ["/a.tar", "/b.tar"]
    assert load_config(["data.source=wds", "data.urls=pipe:cat a.tar", "data.allow_pipe=true"]).data.allow_pipe
    errors = [
        (["data.source=wds"], "data.urls: required when data.source=wds"),
        (["data.source=ffcv"], "data.urls: required when data.source=ffcv"),
        (["data.source=ffcv", "data.urls=[a.beton, b.beton]"], "reads one .beton file"),
        (["data.source=wds", "data.urls=pipe:cat a.tar"], "set data.allow_pipe=true"),
        (["data.source=synthetic", "data.urls=a.tar"], "only read when data.source is wds or ffcv"),
        (["data.source=lmdb"], "valid: imagefolder, synthetic, wds, ffcv"),
        (["data.source=synthetic", "data.remainder=wrap"], "valid: drop, pad"),
        (["data.source=synthetic", "data.max_bad_fraction=1.5"], "must be >= 0 and <= 1"),
        (["data.source=synthetic", "data.views=simclr"], "valid: mae, mocov3"),
    ]
    for overrides, message in errors:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
            load_config(overrides)
