"""Decoding on the training device (``data.decode=gpu``), run on the CPU through the same code: the
same crop geometry as the worker's decode, pixels within a stated tolerance, bad samples counted,
resume unaffected, and a training step and ``bench step`` fed by it.

Tolerances, in uint8 levels of the view (normalisation undone): against the worker's decode at full
size (``fast_decode=false``) at most 2 levels anywhere and a mean of at most 0.25 (float32 bicubic
rounded once, against the fixed-point uint8 kernel, which also rounds between its horizontal and
vertical passes); against its DCT-scaled decode (the default) a mean of
at most 3 levels, the difference between the two downscales."""

import io
import itertools
import json
import logging
import math
import random
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_sources import write_tar

from mimscale.cli import main
from mimscale.data_pipeline import views as views_module
from mimscale.data_pipeline.gpu_decode import collate_encoded, decode_batch, defer_views
from mimscale.data_pipeline.loader import PretrainLoader
from mimscale.data_pipeline.sources.wds import TarShardSource
from mimscale.data_pipeline.synthetic import sample_at, write_shards
from mimscale.data_pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD
from mimscale.data_pipeline.views import decode_views, mae_views, mocov3_views

CPU = torch.device("cpu")
# on a GPU machine also nvJPEG on CUDA (no CI machine has one: not a skip); its IDCT and chroma
# upsampling are not libjpeg-turbo's, so its pixels get a looser bound (mean 1 level)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _levels(x: torch.Tensor) -> torch.Tensor:
    """Normalised views back to uint8 levels (float)."""
    std, mean = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (IMAGENET_STD, IMAGENET_MEAN))
    return x * std + mean


def _encode(arr, fmt="JPEG", mode=None, **kw) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    (im.convert(mode) if mode else im).save(buf, fmt, **kw)
    return buf.getvalue()


def _without_quant_tables(data: bytes) -> bytes:
    """A JPEG whose header reads (size, colour space, EOI at the end) but which no decoder can
    decode: its quantisation tables (DQT segments) are removed."""
    out, i = bytearray(data[:2]), 2
    while data[i + 1] != 0xDA:  # up to the start of the scan
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if data[i + 1] != 0xDB:
            out += data[i:i + 2 + length]
        i += 2 + length
    return bytes(out + data[i:])


@pytest.fixture(scope="module")
def jpegs():
    """Photos of several sizes, subsamplings and kinds (textured generated images, upscaled)."""
    def photo(index, height, width):
        return np.array(Image.fromarray(sample_at(0, index, size=96).image).resize((width, height), Image.BICUBIC))

    return {
        "420": _encode(photo(1, 300, 400), quality=90),
        "444": _encode(photo(2, 180, 200), quality=90, subsampling=0),
        "progressive": _encode(photo(3, 250, 190), quality=85, progressive=True),
        "grey": _encode(photo(4, 200, 260)[..., 0], quality=90),
        "big": _encode(photo(5, 900, 1100), quality=90),
    }


def _device_batch(samples, specs):
    """A worker's batch of ``Deferred`` samples, as the loader collates it."""
    return {**collate_encoded(samples, len(specs), lambda shape: torch.empty(shape, dtype=torch.uint8)),
            "boxes": torch.tensor([s.boxes for s in samples]), "flips": torch.tensor([s.flips for s in samples]),
            "sizes": torch.tensor([s.original_size for s in samples]),
            "index": torch.arange(len(samples)), "labels": torch.full((len(samples),), -1)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fast", [False, True])
def test_same_geometry_and_close_pixels_as_the_worker(jpegs, fast, device):
    """Per sample and seed the device plan draws what the worker draws. Geometry: the device box is
    the sampled box in original pixels; the worker's is the same box at full size, and with DCT
    scaling ``round(box * s) / s`` per axis, ``s`` its decoded / original size."""
    specs = mae_views(64)
    deferred, worker, scaled = [], [], 0
    for seed, data in enumerate(list(jpegs.values()) * 4):
        a, b = random.Random(seed), random.Random(seed)
        deferred.append(defer_views(data, specs, a))
        worker.append(decode_views(data, specs, b, None, fast))
        assert a.getstate() == b.getstate()  # the same draws, no more
    device = torch.device(device)
    if device.type == "cuda":  # and no host sync on the way (pageable copies, reads)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        views, bad = decode_batch(_device_batch(deferred, specs), specs, device)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert bad == [] and views[0].shape == (20, 3, 64, 64) and views[0].dtype == torch.float32
    assert views[0].device.type == device.type
    views = [v.cpu() for v in views]
    flips = [d.flips for d in deferred]
    assert flips == [w.flips for w in worker] and {f[0] for f in flips} == {True, False}
    for d, w in zip(deferred, worker):
        assert d.original_size == w.original_size
        (box,), (used,) = d.boxes, w.boxes
        assert all(float(v).is_integer() for v in box)
        if not fast:
            assert used == box
            continue
        height, width = d.original_size
        x0, y0, x1, y1 = box
        scale = views_module.dct_scale(width, height, math.ceil(width * 64 / (x1 - x0)),
                                       math.ceil(height * 64 / (y1 - y0)))
        sx, sy = math.ceil(width / scale) / width, math.ceil(height / scale) / height  # libjpeg's scaled size
        assert used == pytest.approx((round(x0 * sx) / sx, round(y0 * sy) / sy,
                                      round(x1 * sx) / sx, round(y1 * sy) / sy), abs=1e-9)
        scaled += scale > 1
    assert not fast or scaled >= 4  # the relation was checked on DCT-scaled decodes
    diff = (_levels(views[0]) - torch.stack([w.images[0] for w in worker]).float()).abs()
    if fast:
        assert diff.mean() <= 3
    elif device.type == "cuda":
        assert diff.mean() <= 1
    else:
        assert diff.max() <= 2 + 1e-3 and diff.mean() <= 0.25


@pytest.mark.parametrize("device", DEVICES)
def test_decoding_leaves_memory_the_current_stream_still_reads_alone(device):
    """Regression for the device-side index assert of ``data.decode=gpu`` during training. On
    CUDA: tensors of the decoded images' byte size are filled, reductions over them are queued
    behind a long kernel, the tensors are freed (their blocks are free for the training stream at
    once), then a batch is decoded: the queued reductions must still see what was written. Under the
    caller's stream nvJPEG would be handed those blocks and overwrite them before the reductions
    ran. On a CPU the same calls run in order and check the decode's plumbing only."""
    from mimscale.data_pipeline.gpu_decode import _decode

    device = torch.device(device)
    size, count = (128, 160), 8
    data = torch.frombuffer(bytearray(_encode(np.full((*size, 3), 200, np.uint8), quality=95)), dtype=torch.uint8)
    filled = [torch.full((3 * size[0] * size[1],), 7, dtype=torch.uint8, device=device) for _ in range(count)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda._sleep(200_000_000)  # the reductions below wait behind this kernel (~0.1 s)
    sums = [t.sum(dtype=torch.int64) for t in filled]
    del filled  # freed while their reductions are still queued
    images, bad = _decode([data] * count, [size] * count, device)
    expected = 7 * 3 * size[0] * size[1]
    assert bad == [] and [int(s) for s in sums] == [expected] * count
    assert all(abs(int(img.float().mean()) - 200) <= 2 for img in images)


def _interpolated_view(img, box, flip, size):
    """The direct way to make a view: crop, ``F.interpolate`` (antialiased bicubic), flip."""
    x0, y0, x1, y1 = (int(v) for v in box)
    view = torch.nn.functional.interpolate(img[None, :, y0:y1, x0:x1].float(), size=(size, size), mode="bicubic",
                                           antialias=True)[0]
    return view.flip(-1) if flip else view


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", ["one canvas", "small chunks"])
def test_batched_resampling_is_interpolate_on_each_crop(device, chunk, monkeypatch):
    """The views made by two batched matmuls per chunk equal crop + ``F.interpolate`` + flip of
    each image: random boxes of every kind (down- and upscaled, one pixel wide, the whole image, at
    the edges), two views, images of three sizes; all on one canvas of the largest size, or in
    chunks of at most two 37 x 53 images (sizes apart, one size split in two)."""
    from mimscale.data_pipeline import gpu_decode

    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 37, 53), (3, 37, 53), (3, 64, 48), (3, 37, 53), (3, 9, 300), (3, 37, 53)]
    images = [torch.randint(0, 256, s, generator=gen, dtype=torch.uint8).to(device) for s in shapes]
    boxes = []
    for i, (_, h, w) in enumerate(shapes):
        per_view = []
        for j in range(2):
            if (i + j) % 4 == 0:
                per_view.append((0, 0, w, h))  # the whole image
            elif (i + j) % 4 == 1:
                x, y = int(torch.randint(0, w, (1,), generator=gen)), int(torch.randint(0, h, (1,), generator=gen))
                per_view.append((x, y, x + 1, min(h, y + 2)))  # one pixel wide: upscaled 32x
            else:
                x0, x1 = sorted(torch.randint(0, w + 1, (2,), generator=gen).tolist())
                y0, y1 = sorted(torch.randint(0, h + 1, (2,), generator=gen).tolist())
                per_view.append((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))
        boxes.append(per_view)
    boxes_t = torch.tensor(boxes, dtype=torch.float32)
    flips = torch.rand(len(shapes), 2, generator=gen) < 0.5
    rows = [5, 0, 3, 1, 4, 2]  # batch rows of the images, in another order
    sizes = (16, 24)
    views = [torch.full((6, 3, s, s), float("nan"), device=device) for s in sizes]
    if chunk == "small chunks":
        monkeypatch.setattr(gpu_decode, "_CHUNK_BYTES", 2 * 4 * 3 * 37 * 53)
    gpu_decode._resample_into(views, list(zip(rows, images)), _by_row(boxes_t, rows), _by_row(flips, rows),
                              torch.device(device))
    for k, (img, r) in enumerate(zip(images, rows)):
        for j, s in enumerate(sizes):
            want = _interpolated_view(img, boxes[k][j], bool(flips[k, j]), s)
            assert torch.allclose(views[j][r], want, atol=2e-3, rtol=0), (k, j, boxes[k][j])


def test_chunks_keep_their_canvas_within_the_budget(monkeypatch):
    """Sorted images go in consecutive chunks, each canvas (count x largest height x largest width)
    within the budget; an image larger than the budget gets a chunk of its own."""
    from mimscale.data_pipeline import gpu_decode

    monkeypatch.setattr(gpu_decode, "_CHUNK_BYTES", 2 * 4 * 3 * 37 * 53)
    shapes = [(9, 300), (37, 53), (37, 53), (37, 53), (37, 60), (64, 48), (400, 400)]
    items = [(i, torch.empty(3, h, w, dtype=torch.uint8)) for i, (h, w) in enumerate(shapes)]
    parts = list(gpu_decode._chunks(items))
    assert [[r for r, _ in part] for part in parts] == [[0], [1, 2], [3], [4], [5], [6]]  # 37 x 60 widens past it
    for part in parts[:-1]:
        h, w = (max(img.shape[i] for _, img in part) for i in (1, 2))
        assert len(part) * 3 * h * w * 4 <= gpu_decode._CHUNK_BYTES


def _by_row(per_image: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Per-image values laid out by batch row (image ``k`` in row ``rows[k]``)."""
    out = torch.empty_like(per_image)
    out[torch.tensor(rows)] = per_image
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_resize_weights_edge_cases(device):
    """One output pixel, a box equal to the output size (the identity), rows that sum to one."""
    from mimscale.data_pipeline.gpu_decode import resize_weights

    start, stop = torch.tensor([3.0, 0.0], device=device), torch.tensor([11.0, 8.0], device=device)
    w = resize_weights(start, stop, 12, 8)
    assert torch.allclose(w[0][:, 3:11], torch.eye(8, device=device), atol=1e-6)  # 8 -> 8: the identity
    assert w[0][:, :3].abs().sum() == 0 and w[0][:, 11:].abs().sum() == 0
    assert torch.allclose(w.sum(-1), torch.ones(2, 8, device=device), atol=1e-6)
    one = resize_weights(torch.tensor([0.0], device=device), torch.tensor([12.0], device=device), 12, 1)
    assert one.shape == (1, 1, 12) and torch.allclose(one.sum(), torch.tensor(1.0, device=device))


def test_the_worker_keeps_what_the_device_does_not_take(jpegs):
    """PNG, CMYK, raw pixels, a truncated JPEG (no EOI marker), an unreadable header: decoded in the
    worker, and nothing drawn from the sample's stream."""
    arr = sample_at(0, 1, size=64).image
    cases = [_encode(arr, "PNG"), _encode(arr, mode="CMYK", quality=90), jpegs["420"][:-200],
             b"\xff\xd8 not a jpeg \xff\xd9", b""]
    for data in cases:
        rng = random.Random(0)
        assert defer_views(data, mae_views(32), rng) is None
        assert rng.getstate() == random.Random(0).getstate()
    assert defer_views(arr.tobytes(), mae_views(32), random.Random(0), shape=arr.shape[:2]) is None
    assert defer_views(jpegs["grey"], mae_views(32), random.Random(0)).original_size == (200, 260)


def test_without_simplejpeg_the_header_is_read_by_pil(jpegs, monkeypatch):
    monkeypatch.setattr(views_module, "simplejpeg", None)
    assert views_module.jpeg_size(jpegs["420"]) == (400, 300)
    assert views_module.jpeg_size(_encode(sample_at(0, 1, size=64).image, mode="CMYK")) is None
    assert views_module.jpeg_size(_encode(sample_at(0, 1, size=64).image, "PNG")) is None


def test_a_jpeg_that_fails_on_the_device_is_replaced_and_reported(jpegs):
    specs = mae_views(32)
    broken = _without_quant_tables(jpegs["444"])
    samples = [defer_views(d, specs, random.Random(i)) for i, d in enumerate([broken, jpegs["420"], broken])]
    assert all(s is not None for s in samples)  # its header is fine: only decoding finds it out
    batch = _device_batch(samples, specs)
    views, bad = decode_batch(batch, specs, CPU)
    assert [row for row, _ in bad] == [0, 2] and bad[0][1].startswith("undecodable on cpu: ")
    assert "Quantization" in bad[0][1]
    assert batch["index"].tolist() == [1, 1, 1] and torch.equal(batch["boxes"][0], batch["boxes"][1])
    assert torch.equal(views[0][0], views[0][1]) and torch.equal(views[0][2], views[0][1])


# --------------------------------------------------------------------------- through the loader

@pytest.fixture(scope="module")
def mixed(tmp_path_factory, jpegs):
    """A shard of 16 samples: JPEGs of every kind, PNGs, a CMYK JPEG, a truncated JPEG (bad in the
    worker) and a JPEG without quantisation tables (bad on the device)."""
    arr = sample_at(0, 7, size=48).image
    kinds = [*jpegs.values(), _encode(arr, "PNG"), _encode(arr, mode="CMYK", quality=90)]
    members = [(f"s{i:02d}", {"jpg": kinds[i % len(kinds)], "cls": str(i % 3).encode()}) for i in range(16)]
    members[5] = ("s05", {"jpg": jpegs["420"][:-300], "cls": b"0"})
    members[11] = ("s11", {"jpg": _without_quant_tables(jpegs["444"]), "cls": b"0"})
    return write_tar(tmp_path_factory.mktemp("gpu_decode") / "mixed.tar", members)


def _epoch(url, decode, workers=0, **kw):
    ld = PretrainLoader(TarShardSource(url), mae_views(32), batch_size=4, seed=5, num_workers=workers,
                        max_bad_fraction=0.5, fast_decode=False, decode=decode, **kw)
    seen = {}
    for b in itertools.islice(iter(ld), 4):
        assert b["images"].shape == (4, 3, 32, 32) and b["images"].dtype == torch.float32
        assert set(b) == {"images", "boxes", "flips", "sizes", "index", "labels", "epoch", "batch", "worker"}
        for i, x, box, flip, label in zip(b["index"].tolist(), b["images"], b["boxes"], b["flips"], b["labels"]):
            seen[i] = (x, box, flip, int(label))
    return ld, seen


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_decoding_on_the_device_matches_the_workers(mixed, workers, caplog):
    with caplog.at_level(logging.WARNING, logger="mimscale.data"):
        device, on_device = _epoch(mixed, "gpu", workers)
    worker, in_worker = _epoch(mixed, "cpu", workers)
    assert device.stats["bad_samples"] == worker.stats["bad_samples"] == 2  # s05 in the worker, s11 here
    assert "undecodable on cpu" in caplog.text and "s05" in caplog.text
    good = set(range(16)) - {5, 11}
    assert good <= set(on_device) and good <= set(in_worker) and not {5, 11} & set(on_device)
    for i in good:
        (x, box, flip, label), (y, box2, flip2, label2) = on_device[i], in_worker[i]
        assert torch.equal(box, box2) and torch.equal(flip, flip2) and label == label2 == i % 3
        diff = (_levels(x[None]) - _levels(y[None])).abs()
        assert diff.max() <= 2 + 1e-3 and diff.mean() <= 0.25


def test_resume_mid_epoch_on_the_device_path(mixed):
    def loader():
        return PretrainLoader(TarShardSource(mixed), mae_views(32), batch_size=4, seed=5, max_bad_fraction=0.5,
                              decode="gpu")

    straight = loader()
    it = iter(straight)
    first = [next(it) for _ in range(2)]
    state = straight.state_dict()
    rest = [next(it) for _ in range(3)]  # into the next epoch
    resumed = loader()
    resumed.load_state_dict(state)
    again = list(itertools.islice(iter(resumed), 3))
    assert first[0]["batch"] == 0
    for a, b in zip(rest, again):
        assert (a["epoch"], a["batch"]) == (b["epoch"], b["batch"])
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["images"], b["images"])
        assert torch.equal(a["boxes"], b["boxes"])


def test_views_the_device_cannot_make_are_refused(mixed):
    with pytest.raises(ValueError, match="random crops and flips only"):
        PretrainLoader(TarShardSource(mixed), mocov3_views(32), batch_size=4, decode="gpu")
    from mimscale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.decode=gpu: .* data.views=mocov3"):
        load_config(["data.source=synthetic", "data.views=mocov3", "data.decode=gpu"])


def test_auto_decodes_on_the_device_only_for_cuda():
    from mimscale.data_pipeline.build import resolve_decode

    assert resolve_decode("auto", mae_views(32), "cuda") == "gpu"
    assert resolve_decode("auto", mae_views(32), "cpu") == "cpu"
    assert resolve_decode("auto", mocov3_views(32), "cuda") == "cpu"
    assert resolve_decode("gpu", mae_views(32), "cpu") == "gpu"


# --------------------------------------------------------------------------- training and bench step

def test_bench_step_trains_from_jpeg_shards_decoded_in_the_training_process(tiny_overrides, tmp_path):
    shards = write_shards(tmp_path / "wds", 24, size=40, quality=90, max_count=8, progress=False)
    out = tmp_path / "bench.json"
    overrides = [*tiny_overrides, "engine.device=cpu", "data.source=wds", f"data.urls={shards}",
                 "data.decode=gpu", "data.num_workers=1", "data.stage=thread"]
    assert main(["bench", "step", *overrides, "--data", "real", "--warmup", "1", "--steps", "2",
                 "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["decode"] == "gpu" and row["stage"] == "thread" and row["data"] == "real" and row["images_per_s"] > 0
    assert row["skipped_steps"] == 0
    assert not [t for t in threading.enumerate() if t.name == "mimscale-data-stage"]  # the run closed it


@pytest.mark.parametrize("decode,workers", [("gpu", 0), ("gpu", 2), ("cpu", 2)])
def test_the_staging_thread_hands_out_the_same_batches(mixed, decode, workers):
    """``data.stage=thread`` moves the decode (or the normalising) to a background thread: the same
    batches in the same order, bit for bit, the same bad samples counted and recorded, the same
    positions to resume from."""
    def run(stage):
        ld = PretrainLoader(TarShardSource(mixed), mae_views(32), batch_size=4, seed=5, num_workers=workers,
                            max_bad_fraction=0.5, decode=decode, stage=stage)
        it = iter(ld)
        out = []
        for _ in range(8):  # two epochs
            b = next(it)
            out.append((b, ld.state_dict(), ld.take_bad_records()))
        it.close()
        return out

    main_run, thread_run = run("main"), run("thread")
    for (a, state_a, bad_a), (b, state_b, bad_b) in zip(main_run, thread_run):
        assert (a["epoch"], a["batch"]) == (b["epoch"], b["batch"]) and state_a == state_b
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["images"], b["images"])
        assert bad_a == bad_b
    assert sum(len(bad) for *_, bad in thread_run) == 4  # s05 and s11, in each epoch


def test_a_loader_resumed_mid_iteration_restarts_its_staging_thread(mixed):
    """``load_state_dict`` on a loader whose staging thread already prepared batches from the old
    position: the next batch is the new position's, and the old thread stops."""
    def loader():
        return PretrainLoader(TarShardSource(mixed), mae_views(32), batch_size=4, seed=5, max_bad_fraction=0.5,
                              decode="gpu", stage="thread")

    straight = loader()
    expected = list(itertools.islice(iter(straight), 4))
    ld = loader()
    it = iter(ld)
    next(it)
    state = ld.state_dict()
    next(it), next(it)
    ld.load_state_dict(state)  # back to batch 1, while the thread is ahead
    again = [next(it) for _ in range(3)]
    for a, b in zip(expected[1:], again):
        assert (a["epoch"], a["batch"]) == (b["epoch"], b["batch"]) and torch.equal(a["images"], b["images"])
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "mimscale-data-stage"]
