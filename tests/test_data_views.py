"""The view pipeline: crop law, geometry, fast JPEG decoding (PIL and simplejpeg), MoCo v3 pairs,
normalisation."""

import io
import math
import random

import numpy as np
import pytest
import torch
from extras import need
from PIL import Image
from torchvision import transforms as T

from mimscale.data_pipeline import views as views_module
from mimscale.data_pipeline.synthetic import sample_at
from mimscale.data_pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from mimscale.data_pipeline.views import (
    ViewSpec,
    dct_scale,
    decode_views,
    eval_views,
    mae_views,
    mocov3_views,
    normalize_uint8,
    sample_crop,
)


@pytest.fixture(params=["pil", "simplejpeg"])
def decoder(request, monkeypatch):
    """Run a test with JPEGs decoded by PIL, then by simplejpeg (the default when installed)."""
    if request.param == "pil":
        monkeypatch.setattr(views_module, "simplejpeg", None)
    else:
        assert views_module.simplejpeg is need("simplejpeg")
    return request.param


def _decoded_sizes(monkeypatch) -> list:
    """Spy: the (width, height) of every decoded pixel grid, whichever decoder made it."""
    sizes = []
    decode = views_module._Encoded.decode

    def spy(self, scale):
        pixels = decode(self, scale)
        sizes.append((pixels.shape[2], pixels.shape[1]))
        return pixels

    monkeypatch.setattr(views_module._Encoded, "decode", spy)
    return sizes


def _encode(arr, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo():
    """A 160x120 image with texture (generated objects on a textured background)."""
    return np.ascontiguousarray(sample_at(0, 3, size=160).image[20:140])


def test_crop_law_matches_torchvision():
    rng = random.Random(0)
    ours = np.array([sample_crop(200, 120, (0.2, 1.0), (3 / 4, 4 / 3), rng) for _ in range(3000)])
    torch.manual_seed(0)
    img = torch.zeros(1, 120, 200)
    theirs = np.array([T.RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)])
    theirs = theirs[:, [1, 0, 3, 2]]  # (i, j, h, w) -> (x0, y0, w, h)
    for boxes in (ours, theirs):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 200).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 120).all()
    area = lambda b: b[:, 2] * b[:, 3] / (200 * 120)
    aspect = lambda b: np.log(b[:, 2] / b[:, 3])
    for stat in (area, aspect, lambda b: b[:, 0] / 200, lambda b: b[:, 1] / 120):
        assert abs(stat(ours).mean() - stat(theirs).mean()) < 0.03
        assert abs(np.quantile(stat(ours), 0.9) - np.quantile(stat(theirs), 0.9)) < 0.05
    a = area(ours)
    assert a.min() >= 0.2 - 0.02 and a.max() <= 1.0


def test_crop_fallback_is_centred_with_clamped_aspect():
    assert sample_crop(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(0)) == (493, 0, 13, 10)
    assert sample_crop(10, 10, (2.0, 3.0), (3 / 4, 4 / 3), random.Random(0)) == (0, 0, 10, 10)


def test_view_is_the_crop_of_its_box_resized(photo):
    spec = ViewSpec(48, flip_p=0.0)
    v = decode_views(_encode(photo), [spec], random.Random(5))
    x0, y0, x1, y1 = v.boxes[0]
    assert v.original_size == (120, 160) and v.flips == [False]
    assert x0 == int(x0) and 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 120
    expected = np.asarray(Image.fromarray(photo).crop((x0, y0, x1, y1)).resize((48, 48), Image.BICUBIC))
    got = v.images[0].permute(1, 2, 0).numpy().astype(float)
    diff = np.abs(got - expected)  # crop-then-resize, up to rounding; the rim may see outside pixels
    assert diff[2:-2, 2:-2].max() <= 1 and diff.mean() < 0.5
    flipped = decode_views(_encode(photo), [ViewSpec(48, flip_p=1.0)], random.Random(5))
    assert flipped.boxes == v.boxes and flipped.flips == [True]
    assert torch.equal(flipped.images[0], v.images[0].flip(-1))


def test_raw_pixels_decode_like_png(photo):
    rng = lambda: random.Random(1)
    raw = decode_views(photo.tobytes(), mae_views(32), rng(), shape=photo.shape[:2])
    png = decode_views(_encode(photo), mae_views(32), rng())
    assert torch.equal(raw.images[0], png.images[0]) and raw.boxes == png.boxes


def test_fast_jpeg_decoding_uses_dct_scaling(decoder, monkeypatch):
    big = np.kron(sample_at(0, 1, size=96).image, np.ones((8, 8, 1), np.uint8))  # 768x768, smooth
    data = _encode(big, "JPEG", quality=95)
    sizes = _decoded_sizes(monkeypatch)
    spec = ViewSpec(64, scale=(0.5, 0.6), flip_p=0.0)
    fast = decode_views(data, [spec], random.Random(0), fast=True)
    assert sizes and max(sizes[-1]) == 768 // 8  # a crop of >= 512 px for 64 px: decoded at 1/8
    factor = 768 // sizes[-1][0]
    full = decode_views(data, [spec], random.Random(0), fast=False)
    assert fast.boxes != full.boxes
    # the box actually used is the sampled one rounded to whole decoded pixels, and says so
    assert all(v % factor == 0 and abs(v - w) <= factor / 2 for v, w in zip(fast.boxes[0], full.boxes[0]))
    assert (fast.images[0].float() - full.images[0].float()).abs().mean() < 4.0  # of 255


def test_centre_view_matches_eval_transform(photo):
    v = decode_views(_encode(photo), eval_views(64, 0.875), random.Random(0))
    ref = eval_transform(64)(Image.fromarray(photo))
    ours = normalize_uint8(v.images[0][None])[0]
    # one resampling pass == torchvision's resize then crop, up to one level of rounding
    assert (ours - ref).abs().max() <= 1.01 / 255 / min(IMAGENET_STD)
    # Resize(73) makes 97x73; CenterCrop(64) keeps columns 16..80 and rows 4..68 (rounded halves)
    sx, sy = 160 / 97, 120 / 73
    assert v.boxes[0] == pytest.approx((16 * sx, 4 * sy, 80 * sx, 68 * sy))


def test_mocov3_views_are_two_different_deterministic_views(photo):
    data = _encode(photo)
    a = decode_views(data, mocov3_views(32), random.Random(7))
    b = decode_views(data, mocov3_views(32), random.Random(7))
    assert len(a.images) == 2 and all(torch.equal(x, y) for x, y in zip(a.images, b.images))
    assert not torch.equal(a.images[0], a.images[1])
    specs = mocov3_views(32)
    assert (specs[0].blur_p, specs[1].blur_p, specs[0].solarize_p, specs[1].solarize_p) == (1.0, 0.1, 0.0, 0.2)
    areas = [(x1 - x0) * (y1 - y0) / (160 * 120) for s in range(200)
             for x0, y0, x1, y1 in decode_views(data, specs, random.Random(s)).boxes]
    assert min(areas) < 0.2  # MoCo v3's scale starts at 0.08, below MAE's 0.2


def test_normalize_matches_torchvision():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ref = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(x.float() / 255)
    assert torch.allclose(normalize_uint8(x), ref, atol=1e-5)


def test_dct_scale_is_pils_draft_rule():
    """Both decoders must land on the grid PIL's ``draft`` picks, or boxes would differ by decoder."""
    rng = random.Random(0)
    for _ in range(40):
        width, height = rng.randint(8, 900), rng.randint(8, 900)
        need_w, need_h = rng.randint(1, width + 20), rng.randint(1, height + 20)
        im = Image.open(io.BytesIO(_encode(np.zeros((height, width, 3), np.uint8), "JPEG")))
        im.draft("RGB", (need_w, need_h))
        s = dct_scale(width, height, need_w, need_h)
        assert im.size == (math.ceil(width / s), math.ceil(height / s)), (width, height, need_w, need_h)
        assert s == 1 or (width / s >= need_w and height / s >= need_h)  # never below what was needed


def _jpegs():
    photo = np.ascontiguousarray(sample_at(0, 5, size=200).image[10:190])  # 200x180, textured
    big = np.kron(sample_at(0, 2, size=100).image, np.ones((4, 4, 1), np.uint8))  # 400x400
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    return {
        "420": _encode(photo, "JPEG", quality=90),
        "444": _encode(photo, "JPEG", quality=90, subsampling=0),
        "422": _encode(photo, "JPEG", quality=75, subsampling=1),
        "progressive": _encode(photo, "JPEG", quality=85, progressive=True),
        "grey": _encode(grey, "JPEG", quality=90),
        "cmyk": _encode_cmyk(photo),
        "big": _encode(big, "JPEG", quality=90),
    }


def _encode_cmyk(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["420", "444", "422", "progressive", "grey", "cmyk", "big"])
def test_simplejpeg_decodes_the_same_views_as_pil(kind, monkeypatch):
    """Same pixels (the same libjpeg-turbo), so the same views and exactly the same boxes, at full
    and DCT-reduced scale, for MAE's, MoCo v3's and the evaluation views."""
    need("simplejpeg")
    data = _jpegs()[kind]
    specs = [ViewSpec(112, scale=(0.6, 1.0)), *mocov3_views(112), *eval_views(112)]  # full scale
    if kind == "big":
        specs = [ViewSpec(48, scale=(0.8, 1.0))]  # a crop of >= 357 px for 48 px: decoded at 1/4
    sizes = _decoded_sizes(monkeypatch)
    for seed in range(3):
        turbo = decode_views(data, specs, random.Random(seed))
        with monkeypatch.context() as m:
            m.setattr(views_module, "simplejpeg", None)
            pil = decode_views(data, specs, random.Random(seed))
        assert turbo.boxes == pil.boxes and turbo.flips == pil.flips and turbo.original_size == pil.original_size
        for a, b in zip(turbo.images, pil.images):
            assert a.shape == b.shape and a.dtype == torch.uint8
            assert (a.int() - b.int()).abs().max() <= 1  # libjpeg-turbo versions may round apart
    assert set(sizes) == ({(100, 100)} if kind == "big" else {(200, 180)})  # both at 1/4, or 1


def test_simplejpeg_takes_only_what_it_decodes_like_pil():
    need("simplejpeg")
    jpegs = _jpegs()
    header = views_module._simplejpeg_header
    assert header(jpegs["420"]) == (200, 180) and header(jpegs["grey"]) == (200, 180)
    assert header(jpegs["cmyk"]) is None  # PIL converts CMYK its own way: it keeps those
    assert header(_encode(np.zeros((8, 8, 3), np.uint8))) is None  # a PNG
    assert header(b"\xff\xd8 not really a jpeg") is None


def test_undecodable_bytes_raise(decoder):
    with pytest.raises(OSError, match="cannot identify image"):
        decode_views(b"not an image" * 4, mae_views(16), random.Random(0))
    ok = _encode(np.zeros((40, 40, 3), np.uint8), "JPEG")
    with pytest.raises(OSError, match="(?i)truncated"):
        decode_views(ok[: len(ok) // 2], mae_views(16), random.Random(0))
