"""``mimscale bench step`` at tiny size on the CPU: its columns follow from the analytic count."""

import json

import pytest
import torch

from mimscale.cli import main
from mimscale.config import load_config
from mimscale.pretrain.engine.flops import step_flops


def bench(tmp_path, overrides, *flags) -> list[dict]:
    out = tmp_path / "bench.json"
    assert main(["bench", "step", *overrides, "--warmup", "1", "--steps", "2", "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())


def check_rows(rows, overrides, batches):
    assert [r["batch"] for r in rows] == batches
    for r in rows:
        flops = step_flops(load_config(overrides + [f"data.batch_size={r['batch']}"])).per_step
        assert r["tflops_per_s"] == pytest.approx(flops * r["images_per_s"] / r["batch"] / 1e12, rel=1e-9)
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["peak_mem_gb"] > 0
        assert 0 <= r["data_wait_share"] <= 1
        assert r["skipped_steps"] == 0


def test_bench_step_sweeps_batches_from_memory(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, "engine.device=cpu"]
    rows = bench(tmp_path, overrides, "--batch", "4,8", "--profile", str(tmp_path / "prof.txt"))
    check_rows(rows, overrides, [4, 8])
    assert all(r["mfu"] is None and r["data"] == "memory" for r in rows)  # a CPU has no known peak
    assert all(r["device_busy_share"] is None for r in rows)  # kernels are timed on CUDA only
    for b in (4, 8):  # one operator table per batch size, led by the real step's matmuls
        table = (tmp_path / f"prof.txt.b{b}").read_text()
        assert table.startswith("5 training steps, operators by self_cpu_time_total") and "aten::" in table
        assert "aten::mm" in table or "aten::addmm" in table


def test_bench_step_reads_real_data_with_a_given_peak(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, "recipe=idm", "engine.peak_tflops=2.0", "data.num_workers=1"]
    (row,) = bench(tmp_path, overrides, "--data", "real")
    check_rows([row], overrides, [8])
    assert row["data"] == "real" and row["mfu"] == pytest.approx(row["tflops_per_s"] / 2.0, rel=1e-9)


def test_count_only_runs_nothing(tiny_overrides, tmp_path, capsys):
    assert main(["bench", "step", *tiny_overrides, "--count-only", "--json", str(tmp_path / "x.json")]) == 0
    out = capsys.readouterr().out
    assert "| encoder |" in out and "GFLOP per image" in out
    assert not (tmp_path / "x.json").exists()


def test_busy_share_counts_overlapping_kernels_once():
    """Against counting covered microseconds one by one: nested, overlapping, touching, outside the
    window, empty."""
    from mimscale.pretrain.engine.bench_step import busy_share

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        starts = torch.randint(0, 90, (12,), generator=gen).tolist()
        spans = [(a, a + int(torch.randint(0, 25, (1,), generator=gen))) for a in starts]
        covered = sum(any(a <= t < b for a, b in spans) for t in range(10, 100))
        assert busy_share(spans, 10, 100) == pytest.approx(covered / 90)
    assert busy_share([(0, 5), (5, 10)], 0, 10) == 1.0 and busy_share([], 0, 10) == 0.0
