"""Result JSONs and the table ``mimscale results`` makes of them."""

import csv
import io
import json

import pytest

from mimscale.cli import main
from mimscale.downstream.results import build_table, read_results, to_markdown, write_result


def _write(run, benchmark, value, checkpoint, recipe="mae", **kw):
    return write_result(run, benchmark, "top1", value, checkpoint=checkpoint, recipe=recipe, epochs=100,
                        config_hash="abc123def456", metrics={"top1": value, "top5": value + 10, "n": 50000},
                        **kw)


def test_result_json_has_the_fields(tmp_path):
    path = _write(tmp_path / "run", "imagenet@1%/finetune+occlude50", 61.25, "vitb@100")
    assert path == tmp_path / "run" / "results" / "imagenet@1%_finetune+occlude50.json"
    record = json.loads(path.read_text())
    for key in ("benchmark", "metric", "value", "checkpoint", "recipe", "epochs", "config_hash"):
        assert key in record
    assert record["value"] == 61.25 and record["metrics"]["top5"] == 71.25 and record["mimscale_result"] == 1


def test_table_rows_columns_and_newest_wins(tmp_path, capsys):
    _write(tmp_path / "a" / "ft", "imagenet/finetune", 83.0, "vitb_mae@800", recipe="mae")
    _write(tmp_path / "a" / "lp", "imagenet/linprobe", 68.0, "vitb_mae@800", recipe="mae")
    _write(tmp_path / "b" / "ft", "imagenet/finetune", 83.6, "vitb_gpa@200", recipe="gpa")
    _write(tmp_path / "b" / "knn", "cifar10/knn", 40.5, "vitb_gpa@200", recipe="gpa")
    old = _write(tmp_path / "b" / "old", "imagenet/finetune", 10.0, "vitb_gpa@200", recipe="gpa")
    record = json.loads(old.read_text())
    record["time"] = "2000-01-01T00:00:00"  # an older re-run of the same cell loses
    old.write_text(json.dumps(record))
    (tmp_path / "b" / "other.json").write_text('{"not": "a result"}')
    assert len(read_results(tmp_path)) == 5

    table = build_table(read_results(tmp_path))
    assert table.rows == ["vitb_gpa@200", "vitb_mae@800"]
    assert table.columns == ["imagenet/finetune", "imagenet/linprobe", "cifar10/knn"]
    assert table.value("vitb_gpa@200", "imagenet/finetune") == 83.6
    assert table.value("vitb_mae@800", "cifar10/knn") is None
    md = to_markdown(table)
    assert "| checkpoint | imagenet/finetune | imagenet/linprobe | cifar10/knn |" in md
    assert "| vitb_gpa@200 | 83.60 |  | 40.50 |" in md

    assert main(["results", str(tmp_path), "--rows", "recipe", "--metric", "top5"]) == 0
    out = capsys.readouterr().out
    assert "| recipe | imagenet/finetune |" in out and "| gpa | 93.60 |" in out
    rows = list(csv.reader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert rows[0] == ["recipe", "imagenet/finetune", "imagenet/linprobe", "cifar10/knn"]
    assert rows[1][0] == "gpa" and float(rows[1][1]) == pytest.approx(93.6)
    assert (tmp_path / "results.md").read_text() in out


def test_results_errors(tmp_path, capsys):
    assert main(["results", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["results", str(tmp_path / "empty")]) == 2
    assert "no result JSONs" in capsys.readouterr().err


def test_mask_ratio_recorded_when_known_and_older_records_still_read(tmp_path):
    known = json.loads(_write(tmp_path / "a", "cifar10/knn", 40.0, "x@1", mask_ratio=0.75).read_text())
    unknown = json.loads(_write(tmp_path / "b", "cifar10/knn", 41.0, "y@1").read_text())
    assert known["mask_ratio"] == 0.75 and "mask_ratio" not in unknown
    # a record written before the field existed
    old = {"mimscale_result": 1, "benchmark": "imagenet/finetune", "metric": "top1", "value": 83.0,
           "checkpoint": "old@1", "recipe": "mae", "epochs": 100, "config_hash": "0" * 12,
           "metrics": {"top1": 83.0, "top5": 96.0, "n": 50000}, "time": "2024-01-01T00:00:00"}
    (tmp_path / "c" / "results").mkdir(parents=True)
    (tmp_path / "c" / "results" / "imagenet_finetune.json").write_text(json.dumps(old))
    table = build_table(read_results(tmp_path))
    assert table.value("old@1", "imagenet/finetune") == 83.0 and table.value("x@1", "cifar10/knn") == 40.0
