"""Commands that only read files or print text start without loading torch: building the command
line imports every subcommand's module, so those modules import their heavy dependencies inside
the functions that run. Each command runs in a fresh interpreter, which reports the heavy modules
it loaded and its CPU time (CPU, not wall time: the latter moves with the machine's load)."""

import json
import os
import subprocess
import sys

import pytest

from mimscale.downstream.results import write_result
from mimscale.slurm.book import RunBook

HEAVY = ("torch", "torchvision", "timm", "numpy", "PIL", "matplotlib", "safetensors", "mmcv", "mmengine")

PROBE = """
import json, resource, sys
from mimscale.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"code": code, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "heavy": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    write_result(root / "results" / "run1", "ade20k/segment", "mIoU", 47.1, checkpoint="vitb@100",
                 recipe="mae", epochs=1, config_hash="x")
    RunBook(root / "run").record("done", job_id="123")
    return root


def _probe(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [
    ["--help"], ["--version"], ["config", "recipes"], ["results", "{root}/results"], ["status", "{root}/run"],
    ["convert", "--help"], ["segment", "--help"], ["finetune", "--help"], ["analyze", "--help"],
    ["bench", "--help"], ["visualize", "masks", "--help"],
], ids=" ".join)
def test_light_commands_load_no_heavy_module(folders, argv):
    report = _probe([a.format(root=folders) for a in argv])
    assert report["code"] == 0
    assert report["heavy"] == [], f"mimscale {' '.join(argv)} imported {report['heavy']}"
    assert report["cpu_s"] < 1.0  # torch alone costs ~1.5 s of CPU; these take ~0.1 s


def test_a_benchmark_still_parses_its_own_arguments():
    """Benchmarks add their arguments when named (their modules need torch): parsing and help
    behave as if the arguments were always there."""
    from mimscale.cli import build_parser

    args = build_parser().parse_args(["bench", "step", "--steps", "3", "model.name=mae_vit_tiny_patch16"])
    assert args.steps == 3 and args.overrides == ["model.name=mae_vit_tiny_patch16"] and callable(args.func)
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", "step", "--bogus"])
    assert e.value.code == 2
