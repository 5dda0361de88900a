"""The loader on every source: batches and geometry, exactly-once over 2 ranks x 2 workers,
sample-exact mid-epoch resume, bad samples (skipped, counted, logged, bounded)."""

import dataclasses
import io
import itertools
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from extras import need
from PIL import Image, UnidentifiedImageError

from mimscale.data_pipeline.bad_samples import decode_reason
from mimscale.data_pipeline.loader import BadDataError, PretrainLoader, build_pretrain_loader
from mimscale.data_pipeline.sources.imagefolder import ImageFolderSource
from mimscale.data_pipeline.sources.wds import TarShardSource
from mimscale.data_pipeline.synthetic import write_imagefolder, write_shards
from mimscale.data_pipeline.views import mae_views, mocov3_views

N, SIZE, IMG, B = 22, 24, 16, 3
SOURCES = ["imagefolder", "wds", "ffcv"]


def make_source(kind: str, folder, n: int = N):
    if kind == "imagefolder":
        return ImageFolderSource(write_imagefolder(folder, n, size=SIZE))
    if kind == "wds":
        return TarShardSource(str(write_shards(folder / "wds", n, size=SIZE, max_count=5, progress=False)))
    need("ffcv")
    from mimscale.data_pipeline.sources.beton import BetonSource

    return BetonSource(write_shards(folder / "data.beton", n, size=SIZE, fmt="beton", progress=False))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sources")


_made = {}


@pytest.fixture(params=SOURCES)
def source(request, data_dir):
    if request.param not in _made:
        _made[request.param] = make_source(request.param, data_dir / request.param)
    return _made[request.param]


def loader(src, **kw):
    kw = {"batch_size": B, "seed": 0, **kw}
    return PretrainLoader(src, kw.pop("views", mae_views(IMG)), **kw)


def take(ld, k):
    return list(itertools.islice(iter(ld), k))


def test_batches_carry_views_and_geometry(source):
    ld = loader(source, views=mocov3_views(IMG))
    b = take(ld, 1)[0]
    assert b["images"].shape == (B, 3, IMG, IMG) and b["images"].dtype == torch.float32
    assert b["images"] is b["views"][0] and len(b["views"]) == 2
    assert b["boxes"].shape == (B, 2, 4) and b["flips"].shape == (B, 2) and b["flips"].dtype == torch.bool
    assert (b["sizes"] == SIZE).all()
    x0, y0, x1, y1 = b["boxes"].unbind(-1)
    assert (x0 >= 0).all() and (x1 <= SIZE).all() and (x0 < x1).all() and (y0 < y1).all()
    assert b["labels"].min() >= 0 and b["index"].dtype == torch.long
    assert (b["epoch"], b["batch"], b["worker"]) == (0, 0, 0) and "bad" not in b
    assert ld.state_dict()["epoch"] == 0 and ld.state_dict()["batch_in_epoch"] == 1


@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_exactly_once_two_ranks_two_workers(source, remainder):
    """Each sample goes to exactly one (rank, worker) per epoch; the remainder is dropped or padded."""
    per_epoch = {}
    steps = None
    for rank in range(2):
        ld = loader(source, rank=rank, world_size=2, num_workers=2, remainder=remainder)
        steps = ld.steps_per_epoch if steps is None else steps
        assert ld.steps_per_epoch == steps  # every rank the same number of batches: no DDP hang
        for b in take(ld, 2 * steps):
            per_epoch.setdefault(b["epoch"], {}).setdefault((rank, b["worker"]), []).extend(b["index"].tolist())
    unit = 2 * B
    for owners in per_epoch.values():
        assert set(owners) == {(r, w) for r in range(2) for w in range(2)}
        counts = Counter(i for ids in owners.values() for i in ids)
        if remainder == "drop":
            assert len(counts) == N // unit * unit and max(counts.values()) == 1  # N=22 -> 18 seen once
            sets = [set(ids) for ids in owners.values()]
            assert all(not a & b for a, b in itertools.combinations(sets, 2))
        else:
            assert set(counts) == set(range(N)) and sum(counts.values()) == -(-N // unit) * unit
    e0, e1 = (sorted(per_epoch[e][(0, 0)]) for e in (0, 1))
    assert e0 != e1  # a new permutation every epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_sees_the_same_samples(source, workers):
    """Stop after k batches (k=9 is in the second epoch), resume in a fresh loader: the sample-id
    sequences (and the augmented images) equal the uninterrupted run's."""
    a = loader(source, num_workers=workers)
    assert a.steps_per_epoch == 7
    it = iter(a)
    for _ in range(9):
        next(it)
    state = a.state_dict()
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)
    expected = [next(it) for _ in range(8)]  # crosses into epoch 2
    b = loader(source, num_workers=workers)
    b.load_state_dict(state)
    got = take(b, 8)
    assert [x["index"].tolist() for x in got] == [x["index"].tolist() for x in expected]
    assert all(torch.equal(x["images"], y["images"]) and torch.equal(x["boxes"], y["boxes"])
               for x, y in zip(got, expected))


def test_worker_count_does_not_change_what_a_rank_sees(source):
    ids = [sorted(torch.cat([b["index"] for b in take(loader(source, num_workers=w), 7)]).tolist())
           for w in (0, 2)]
    assert ids[0] == ids[1]


# on a GPU machine also on CUDA, where pin_memory=thread pins in DataLoader's thread (not a skip)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_prefetch_and_pinning_change_nothing_a_rank_sees(data_dir, device):
    """data.prefetch_factor and data.pin_memory only change when and where a batch is made ready:
    the same batches, in the same order, whatever they are."""
    src = _made.setdefault("wds", make_source("wds", data_dir / "wds"))
    runs = [take(loader(src, num_workers=2, device=device, prefetch_factor=f, pin_memory=p), 6)
            for f, p in ((2, "main"), (1, "thread"), (4, "thread"))]
    assert runs[1][0]["images"].device.type == device
    for got in runs[1:]:
        assert [b["index"].tolist() for b in got] == [b["index"].tolist() for b in runs[0]]
        assert all(torch.equal(x["images"], y["images"]) for x, y in zip(got, runs[0]))
    with pytest.raises(ValueError, match="prefetch_factor 0"):
        loader(src, prefetch_factor=0)
    with pytest.raises(ValueError, match="'disk'"):
        loader(src, pin_memory="disk")


def test_load_state_restarts_a_live_iterator_and_resplits_on_a_new_layout(source, caplog):
    a = loader(source)
    first = take(a, 2)
    it = iter(a)
    next(it)
    a.load_state_dict({**a.state_dict(), "epoch": 0, "batch_in_epoch": 0})
    assert [next(it)["index"].tolist() for _ in range(2)] == [b["index"].tolist() for b in first]
    with caplog.at_level(logging.WARNING, logger="mimscale.data"):
        b = loader(source, num_workers=2)
        b.load_state_dict({**a.state_dict(), "batch_in_epoch": 3})
    assert "workers 1 -> 2" in caplog.text and "not read yet are split over the new one" in caplog.text
    assert b.state_dict()["epoch"] == a.state_dict()["epoch"] and b.rest is not None  # test_data_resplit.py
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict({**a.state_dict(), "seed": 5})


@pytest.mark.parametrize("workers", [0, 2])
def test_global_rng_untouched(source, workers):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    take(loader(source, num_workers=workers), 2)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- bad samples

def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# why each damaged sample of ``_damage`` is skipped, in words (bit rot in a .beton: whatever it became)
REASONS = {"imagefolder": {1: "not an image (unrecognised format; it begins b'garbagegarba')", 4: "zero-byte file",
                           6: "truncated PNG", 9: "PNG whose header cannot be read (truncated or damaged)"},
           "wds": {2: "not an image (unrecognised format; it begins b'not an image')", 5: "missing key",
                   7: "zero-byte image member", 10: "truncated PNG"}}


def _damage(kind: str, folder):
    """A source of 12 samples, 4 of them bad; returns it with ``{id: (where, key)}`` of the bad ones."""
    if kind == "imagefolder":
        src = ImageFolderSource(write_imagefolder(folder, 12, size=SIZE))
        bad = {}
        for i, data in [(1, b"garbage" * 9), (4, b""), (6, None), (9, b"\x89PNG\r\n\x1a\n")]:
            path = Path(src.path(i))
            path.write_bytes(path.read_bytes()[:60] if data is None else data)  # None: truncated
            bad[i] = (str(src.root), os.path.relpath(path, src.root))
        return src, bad
    if kind == "wds":
        from test_data_sources import write_tar

        members = [(f"s{i:02d}", {"png": _png(20 * i), "cls": b"1"}) for i in range(12)]
        members[2] = ("s02", {"png": b"not an image"})  # undecodable
        members[5] = ("s05", {"cls": b"3"})  # missing key
        members[7] = ("s07", {"png": b""})  # zero-byte member
        members[10] = ("s10", {"png": _png(9)[:50]})  # truncated image
        url = write_tar(folder / "bad.tar", members)
        return TarShardSource(url), {i: (url, f"s{i:02d}") for i in (2, 5, 7, 10)}
    need("ffcv")
    from mimscale.data_pipeline.sources.beton import BetonSource

    path = write_shards(folder / "bad.beton", 12, size=SIZE, fmt="beton", progress=False)
    src = BetonSource(path)
    with open(path, "r+b") as f:
        for i in (0, 3, 8, 11):  # bit rot in the stored JPEGs
            f.seek(int(src.image[i]["data_ptr"]))
            f.write(b"\0" * 16 if i % 2 else b"rot!" * 4)
    return BetonSource(path), {i: (str(path), f"sample {i}") for i in (0, 3, 8, 11)}


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_counted_and_logged(kind, workers, tmp_path, caplog):
    src, bad = _damage(kind, tmp_path)
    ld = PretrainLoader(src, mae_views(IMG), batch_size=4, num_workers=workers, max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="mimscale.data"):
        batches = take(ld, 6)  # two epochs of 12
    assert ld.stats["bad_samples"] == 2 * len(bad)
    for b in batches:
        assert b["images"].shape[0] == 4 and torch.isfinite(b["images"]).all()
        assert not set(b["index"].tolist()) & set(bad)  # stand-ins are good neighbours
    for i, (where, key) in bad.items():
        assert f"{where} key {key}: {REASONS.get(kind, {}).get(i, '')}" in caplog.text
    assert " at 0x" not in caplog.text  # no object reprs: the reason is said in words
    records = ld.take_bad_records()  # what the run's list gets: each bad sample once per epoch
    assert ld.take_bad_records() == [] and len(records) == 2 * len(bad)
    assert sorted((r["epoch"], r["shard"], r["key"]) for r in records) == sorted(
        (e, where, key) for e in range(2) for where, key in bad.values())
    assert all(r["rank"] == 0 and 0 <= r["batch"] < 3 and r["reason"] for r in records)
    for e in range(2):
        seen = torch.cat([b["index"] for b in batches if b["epoch"] == e]).tolist()
        assert set(range(12)) - set(bad) <= set(seen)


def test_the_bad_sample_count_survives_a_resume(tmp_path):
    """The count is part of the loader's state: a loader resumed mid-run goes on counting from it."""
    src, bad = _damage("wds", tmp_path)
    whole = PretrainLoader(src, mae_views(IMG), batch_size=4, max_bad_fraction=0.5)
    take(whole, 6)
    first = PretrainLoader(src, mae_views(IMG), batch_size=4, max_bad_fraction=0.5)
    take(first, 4)
    state = first.state_dict()
    assert 0 < state["bad_samples"] == first.stats["bad_samples"] < 2 * len(bad)
    second = PretrainLoader(src, mae_views(IMG), batch_size=4, max_bad_fraction=0.5)
    second.load_state_dict(state)
    take(second, 2)
    assert second.stats["bad_samples"] == whole.stats["bad_samples"] == 2 * len(bad)


@pytest.mark.parametrize("data,error,reason", [
    (b"", OSError("x"), "empty file"),
    (b"<html>oops</html>", UnidentifiedImageError("cannot identify image file <_io.BytesIO object at 0x7f00>"),
     "not an image (unrecognised format; it begins b'<html>oops</')"),
    (b"\xff\xd8\xff\xe0" + bytes(8), UnidentifiedImageError("cannot identify image file <_io.BytesIO object at 0x7f00>"),
     "JPEG whose header cannot be read (truncated or damaged)"),
    (b"\xff\xd8\xff\xe0" + bytes(99), OSError("image file is truncated (8 bytes not processed)"), "truncated JPEG"),
    (b"RIFF\0\0\0\0WEBPVP8 ", OSError("broken data stream when reading image file"),
     "damaged WebP (broken data stream when reading image file)"),
    (b"\x89PNG\r\n\x1a\n", SyntaxError("broken PNG file"), "damaged PNG (broken PNG file)"),
])
def test_decode_failures_are_said_in_words(data, error, reason):
    assert decode_reason(data, error) == reason


def test_too_many_bad_samples_stop_the_run(tmp_path):
    src, bad = _damage("wds", tmp_path)
    ld = PretrainLoader(src, mae_views(IMG), batch_size=4, max_bad_fraction=0.25)  # 3 of 12 allowed
    with pytest.raises(BadDataError, match=r"4 bad samples in epoch 0 on rank 0, more than "
                                           r"data.max_bad_fraction=0.25 of its 12 samples; last: .*bad.tar key s(02|05|07|10): "):
        take(ld, 3)
    strict = PretrainLoader(src, mae_views(IMG), batch_size=4, max_bad_fraction=0)
    with pytest.raises(BadDataError, match="1 bad samples"):
        take(strict, 1)


def test_legacy_imagefolder_builder(tmp_path):
    root = write_imagefolder(tmp_path, 10, size=SIZE)
    ld = build_pretrain_loader(root, IMG, 5, seed=3, crop_scale=(0.5, 1.0), hflip=False)
    b = take(ld, 2)
    assert sorted(torch.cat([x["index"] for x in b]).tolist()) == list(range(10))
    assert not b[0]["flips"].any()


def test_config_reaches_the_loader(tmp_path):
    from mimscale.config import load_config
    from mimscale.data_pipeline.build import build_pretrain_data

    cfg = load_config(["data.source=synthetic", f"data.root={tmp_path}", "data.synthetic_images=8",
                       "data.synthetic_size=24", "data.batch_size=4", "data.prefetch_factor=3",
                       "data.pin_memory=thread", "data.stage=thread"])
    ld = build_pretrain_data(cfg.data, IMG, seed=0)
    assert ld.prefetch_factor == 3 and not ld.pin_thread  # pinning means nothing for a CPU run
    assert ld.stage_thread
    auto = dataclasses.replace(cfg.data, stage="auto")
    assert not build_pretrain_data(auto, IMG, seed=0).stage_thread  # main on a CPU
