"""fedgap sweep: grid parsing, and a real tiny grid through the CLI with caching."""

import csv
import json
import os

import pytest

from conftest import cli, tiny_args
from fedgap.experiment.outputs import read_metrics
from fedgap.runs.sweep import grid, split_values


def test_commas_inside_brackets_stay_in_one_value():
    assert split_values("a,b,[1,2],{x: 1, y: 2}") == ["a", "b", "[1,2]", "{x: 1, y: 2}"]


def test_grid_is_the_product_of_the_listed_values():
    keys, points = grid(["server.rounds=3", "model.norm=batch,group", "client.lr=0.1,0.01,0.001"])
    assert keys == ["model.norm", "client.lr"]
    assert len(points) == 6 and all(p[0] == "server.rounds=3" for p in points)
    assert ["server.rounds=3", "model.norm=group", "client.lr=0.001"] in points


def test_sweep_runs_the_grid_and_reuses_it(tiny_idx, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", *tiny_args(tiny_idx), "model.norm=batch,group", "--out", str(out), "--jobs", "1", "--quiet"]
    code, stdout, err = cli(*args, capsys=capsys)
    assert code == 0, err
    with open(out / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["model.norm"] for r in rows) == ["batch", "group"]
    assert all(0 <= float(r["final_test_accuracy"]) <= 1 for r in rows)
    for r in rows:  # the doctor's final accuracy beside the last evaluation: mean of the last 3 evaluations
        accs = [float(m["test_accuracy"]) for m in read_metrics(out / r["run_dir"] / "metrics.csv")
                if m["test_accuracy"]]
        assert float(r["late_test_accuracy"]) == pytest.approx(sum(accs[-3:]) / len(accs[-3:]))
    assert (out / "sweep.png").stat().st_size > 1000 and (out / "summary.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    assert len(stamps) == 2
    assert cli(*args, capsys=capsys)[0] == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")} == stamps


def test_with_a_validation_split_the_grid_is_ranked_by_validation(tiny_idx, tmp_path, capsys):
    out = tmp_path / "sweep"
    code, stdout, err = cli("sweep", *tiny_args(tiny_idx), "data.validation=0.2", "client.lr=0.001,0.05,0.3",
                            "--out", str(out), "--jobs", "1", "--quiet", capsys=capsys)
    assert code == 0, err
    assert "ranked by validation" in stdout
    with open(out / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    vals = [float(r["late_val_accuracy"]) for r in rows]
    for r, val in zip(rows, vals, strict=True):  # the mean of the run's last 3 validation evaluations
        accs = [float(m["val_accuracy"]) for m in read_metrics(out / r["run_dir"] / "metrics.csv")
                if m["val_accuracy"]]
        assert val == pytest.approx(sum(accs[-3:]) / len(accs[-3:]))
    assert vals == sorted(vals, reverse=True)  # the top row is the validation's choice, whatever test says


def test_a_bad_grid_value_is_one_line_naming_the_key(capsys):
    code, _, err = cli("sweep", "model.norm=batch,banana", "--out", "/tmp/never-sweep", capsys=capsys)
    assert code == 2 and "model.norm" in err and "Traceback" not in err


def test_pool_runs_use_their_share_of_the_cores(tiny_idx, tmp_path, capsys):
    """Two jobs on two cores must run one intra-op thread each: with the engine's default (all cores) in every
    job, four OpenMP threads share two cores and wait for each other at every barrier (measured: 7x slower)."""
    out = tmp_path / "sweep"
    code, _, err = cli("sweep", *tiny_args(tiny_idx), "model.norm=batch,group", "--out", str(out), "--jobs", "2",
                       "--quiet", capsys=capsys)
    assert code == 0, err
    expected = max(1, (os.cpu_count() or 1) // 2)
    threads = [json.loads(p.read_text())["intra_op_threads"] for p in out.glob("runs/*/summary.json")]
    assert threads == [expected, expected]


def test_a_run_left_alone_in_a_batch_keeps_the_threads_of_its_batch(tiny_idx, tmp_path, capsys):
    """A run's float32 numbers depend on its intra-op threads, so they never depend on how many runs happened to
    be left to run beside it (a grid extended by one point, a resumed doctor): cores // jobs, or --threads."""
    out = tmp_path / "sweep"
    args = ["sweep", *tiny_args(tiny_idx), "--out", str(out), "--jobs", "2", "--quiet"]
    assert cli(*args, "model.norm=batch,group", capsys=capsys)[0] == 0
    assert cli(*args, "model.norm=batch,group,layer", capsys=capsys)[0] == 0  # only 'layer' runs: alone
    expected = max(1, (os.cpu_count() or 1) // 2)
    threads = [json.loads(p.read_text())["intra_op_threads"] for p in out.glob("runs/*/summary.json")]
    assert threads == [expected] * 3
    assert cli("sweep", *tiny_args(tiny_idx), "model.norm=batch,group", "--out", str(tmp_path / "t3"), "--threads",
               "3", "--quiet", capsys=capsys)[0] == 0
    assert [json.loads(p.read_text())["intra_op_threads"] for p in (tmp_path / "t3").glob("runs/*/summary.json")] \
        == [3, 3]
