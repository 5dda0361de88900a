"""`mimscale bench data` runs every row on the same images and prints the ratios."""

import json
import subprocess
import sys
import time

import pytest
from extras import need

from mimscale.cli import main
from mimscale.data_pipeline.bench import _cpu_seconds


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
    assert "| CPU ms/image |" in out and "CPU per image ffcv / wds = " in out
    assert all(len(v) == 2 and min(v) > 0 for v in result["cpu_ms_per_image"].values())
    # the paired statistic: the median of the two rounds' own wds / other ratios
    speeds = result["images_per_s"]
    for row in ("torchvision", "imagefolder", "ffcv"):
        want = sum(w / o for w, o in zip(speeds["wds"], speeds[row])) / 2
        assert result["wds_paired_ratio"][row] == pytest.approx(want)
    assert "per round: median " in out and " of 2" in out


def test_cpu_time_counts_live_children():
    """A row's CPU time includes its loader workers (child processes), not only the main process."""
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.4: pass\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 20  # a busy machine may give the child little CPU at first
        while _cpu_seconds() - time.process_time() < 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _cpu_seconds() - time.process_time() >= 0.3
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_bench_data_ffcv_native_row(tmp_path):
    need("ffcv")
    result = _bench(tmp_path, "wds,ffcv-native", rounds=1)  # ffcv compiles its pipeline first
    assert result["median"]["ffcv-native"] > 0


def test_bench_data_decoding_in_the_main_process(tmp_path, capsys):
    """The wds-gpu row: workers plan, the main process decodes (on the GPU where there is one)."""
    result = _bench(tmp_path, "wds,wds-gpu", rounds=1)
    assert "| wds-gpu |" in capsys.readouterr().out
    assert set(result["median"]) == {"wds", "wds-gpu"} and result["median"]["wds-gpu"] > 0
