"""`mimscale bench data` runs every row on the same images and prints the ratios."""

import json
import os

import pytest

from mimscale.cli import main


def need(module):
    """Skip for a missing optional extra on a developer machine; never in CI."""
    if os.environ.get("CI") == "true":
        return __import__(module)
    return pytest.importorskip(module)


def _bench(tmp_path, rows: str, rounds: int) -> dict:
    args = ["bench", "data", "--images", "16", "--image-size", "48x36", "--img-size", "32", "--batch-size", "4",
            "--workers", "0", "--batches", "2", "--warmup", "1", "--rounds", str(rounds), "--rows", rows,
            "--cache", str(tmp_path), "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    return json.loads((tmp_path / "r.json").read_text())


def test_bench_data_tiny(tmp_path, capsys):
    need("ffcv")
    result = _bench(tmp_path, "torchvision,imagefolder,wds,ffcv", rounds=2)
    out = capsys.readouterr().out
    for row in ("torchvision", "imagefolder", "wds", "ffcv"):
        assert f"| {row} |" in out
    assert "| torchvision | " in out and "1.00x" in out
    assert "wds / torchvision = " in out and "wds / ffcv = " in out
    assert set(result["median"]) == {"torchvision", "imagefolder", "wds", "ffcv"}
    assert all(len(v) == 2 and min(v) > 0 for v in result["images_per_s"].values())


@pytest.mark.slow
def test_bench_data_ffcv_native_row(tmp_path):
    need("ffcv")
    result = _bench(tmp_path, "wds,ffcv-native", rounds=1)  # ffcv compiles its pipeline first
    assert result["median"]["ffcv-native"] > 0
