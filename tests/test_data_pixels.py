"""Every PIL mode becomes 8-bit RGB by the documented rule (data_pipeline/pixels.py), checked
against references computed with numpy, and 16-bit PNGs keep their grey through every reader."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mimscale.cli import main
from mimscale.data_pipeline.loader import PretrainLoader
from mimscale.data_pipeline.pixels import to_rgb
from mimscale.data_pipeline.shards import ImageFolderInput, write_wds
from mimscale.data_pipeline.sources.imagefolder import ImageFolderSource
from mimscale.data_pipeline.sources.wds import TarShardSource, read_index
from mimscale.data_pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD
from mimscale.data_pipeline.views import mae_views

H, W = 6, 10
rng = np.random.default_rng(0)
RGB = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
GREY = rng.integers(0, 256, (H, W), dtype=np.uint8)
ALPHA = rng.integers(0, 256, (H, W), dtype=np.uint8)
SIXTEEN = rng.integers(0, 65536, (H, W)).astype(np.uint16)
SIXTEEN[0, :2] = (0, 65535)


def grey3(g: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(g, np.uint8)[..., None], 3, -1)


def stretched(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return grey3(np.rint((v - v.min()) / (v.max() - v.min()) * 255))


def palette_case(alpha: bool):
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    idx = rng.integers(0, 256, (H, W), dtype=np.uint8)
    im = Image.fromarray(idx, "L").convert("P")
    im.putpalette(palette.tobytes())
    if alpha:
        im = im.convert("PA")
        assert (np.asarray(im)[..., 0] == idx).all()
    return im, palette[idx]


def cmyk_case():
    cmyk = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    return Image.fromarray(cmyk, "CMYK"), (255 - c) * (255 - k) / 255


def ycbcr_case():
    ycc = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                    y + 1.772 * (cb - 128)], -1)
    return Image.fromarray(ycc, "YCbCr"), np.clip(rgb, 0, 255)


def float_case(values: np.ndarray):
    return Image.fromarray(values.astype(np.float32), "F")


BITS = rng.integers(0, 2, (H, W)).astype(bool)
SIGNED = rng.integers(-70000, 70000, (H, W)).astype(np.int32)
UNIT = rng.random((H, W))
WIDE = rng.normal(0, 3, (H, W))

# mode -> (image, exact reference, tolerance): colour conversions of floating formulas get 1 level
CASES = {
    "1": lambda: (Image.fromarray(BITS), grey3(BITS * 255), 0),
    "L": lambda: (Image.fromarray(GREY, "L"), grey3(GREY), 0),
    "LA": lambda: (Image.fromarray(np.stack([GREY, ALPHA], -1), "LA"), grey3(GREY), 0),
    "P": lambda: (*palette_case(False), 0),
    "PA": lambda: (*palette_case(True), 0),
    "RGB": lambda: (Image.fromarray(RGB, "RGB"), RGB, 0),
    "RGBA": lambda: (Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA"), RGB, 0),
    "CMYK": lambda: (*cmyk_case(), 1),
    "YCbCr": lambda: (*ycbcr_case(), 1),
    "I;16": lambda: (Image.fromarray(SIXTEEN), grey3(np.rint(SIXTEEN / 257)), 0),
    "I;16B": lambda: (Image.frombytes("I;16B", (W, H), SIXTEEN.astype(">u2").tobytes()),
                      grey3(np.rint(SIXTEEN / 257)), 0),
    "I;16L": lambda: (Image.frombytes("I;16L", (W, H), SIXTEEN.astype("<u2").tobytes()),
                      grey3(np.rint(SIXTEEN / 257)), 0),
    "I": lambda: (Image.fromarray(SIXTEEN.astype(np.int32), "I"), grey3(np.rint(SIXTEEN / 257)), 0),
    "I (outside 0-65535)": lambda: (Image.fromarray(SIGNED, "I"), stretched(SIGNED), 0),
    "F": lambda: (float_case(UNIT), grey3(np.rint(UNIT.astype(np.float32) * 255.0)), 0),
    "F (outside 0-1)": lambda: (float_case(WIDE), stretched(WIDE.astype(np.float32)), 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_matches_its_numpy_reference(case):
    im, reference, tolerance = CASES[case]()
    assert im.mode == case.split(" ")[0]
    out = to_rgb(im)
    assert out.mode == "RGB" and out.size == (W, H)
    diff = np.abs(np.asarray(out).astype(np.int64) - np.rint(reference).astype(np.int64))
    assert diff.max() <= tolerance, (case, diff.max())


def test_a_palette_transparency_is_dropped_without_a_warning(recwarn):
    im, reference = palette_case(False)
    im.info["transparency"] = bytes(range(256))
    assert (np.asarray(to_rgb(im)) == reference).all() and not recwarn.list


# --------------------------------------------------------------------------- 16-bit PNGs end to end

GREY_MEAN = 119
SIDE = 40


def png16(path) -> float:
    """A 16-bit greyscale PNG whose 8-bit mean grey is about 119 (noise, so every crop has it)."""
    values = np.clip(rng.normal(GREY_MEAN * 257, 3000, (SIDE, SIDE)), 0, 65535).astype(np.uint16)
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    return float(np.rint(values / 257).mean())


@pytest.fixture(scope="module")
def folder16(tmp_path_factory):
    root = tmp_path_factory.mktemp("png16")
    means = []
    for c in ("a", "b"):
        (root / c).mkdir()
        means += [png16(root / c / f"{i}.png") for i in range(3)]
    assert abs(np.mean(means) - GREY_MEAN) < 1
    return root


def loaded_pixel_means(src) -> torch.Tensor:
    """Per-image mean of every batch's first view, back in 0-255."""
    ld = PretrainLoader(src, mae_views(16), batch_size=3, max_bad_fraction=0)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    batches = [b["images"] for _, b in zip(range(ld.steps_per_epoch), ld)]
    return torch.cat([(x * std + mean) * 255 for x in batches]).flatten(1).mean(1)


def test_16bit_pngs_keep_their_grey_in_the_imagefolder_source_and_loader(folder16):
    src = ImageFolderSource(folder16)
    image, _ = src[0]
    pixels = np.asarray(image)
    assert image.mode == "RGB" and abs(pixels.mean() - GREY_MEAN) < 3 and pixels.std() > 5
    means = loaded_pixel_means(src)
    assert len(means) == 6 and ((means - GREY_MEAN).abs() < 4).all(), means


def test_16bit_pngs_keep_their_grey_from_shards(folder16, tmp_path):
    index = write_wds(ImageFolderInput(folder16), tmp_path / "wds", progress=False)
    means = loaded_pixel_means(TarShardSource(str(index)))
    assert len(means) == 6 and ((means - GREY_MEAN).abs() < 4).all(), means


def test_16bit_pngs_keep_their_grey_when_shards_write_reencodes(folder16, tmp_path):
    out = tmp_path / "small"
    assert main(["shards", "write", "--imagefolder", str(folder16), str(out), "--max-side", "20",
                 "--no-progress"]) == 0
    src = TarShardSource(str(out / "index.json"))
    records = list(src.read(np.arange(len(src))))
    assert len(records) == 6 and len(read_index(out / "index.json")[0]) == 1
    for rec in records:
        with Image.open(io.BytesIO(rec.data)) as im:
            pixels = np.asarray(im.convert("RGB"))
            assert im.format == "JPEG" and im.size == (20, 20)
        assert abs(pixels.mean() - GREY_MEAN) < 3 and pixels.std() > 2, pixels.mean()
