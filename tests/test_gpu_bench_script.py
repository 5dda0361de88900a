"""``tools/gpu_bench.sh`` in its dry mode (tiny model, CPU): a section runs, writes its rows, and the
closing summary table carries every ``bench step`` row and nothing else."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_bench.sh"


def test_dry_kernels_section_writes_rows_and_their_summary(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "masking.json").write_text(json.dumps([{"row": "gpa", "time_ratio": 1.2}]))  # another bench's rows
    env = {**os.environ, "MIMSCALE_BENCH_DRY": "1", "ONLY": "kernels", "OUT": str(out), "PYTHON": sys.executable,
           "MIMSCALE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    runs = sorted(p.stem for p in out.glob("vitb_*.json"))
    assert runs == ["vitb_attn_math", "vitb_memory"]
    for name in runs:
        assert f"== {name}: exit 0" in (out / f"{name}.log").read_text()
    summary = (out / "summary.md").read_text().splitlines()
    assert summary[0].startswith("| run | model | batch |") and "device busy" in summary[0]
    body = summary[2:]
    assert [line.split(" | ")[0].lstrip("| ") for line in body] == runs  # one line per row, masking left out
    for name, line in zip(runs, body):
        (row,) = json.loads((out / f"{name}.json").read_text())
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:5] == [row["model"], str(row["batch"]), "off", "memory"]
        assert cells[5] == f"{row['images_per_s']:,.0f}" and cells[6] == f"{row['step_ms']:.1f}"
        assert cells[7] == "-" and cells[9] == "-"  # a CPU has no peak and no kernel timeline
