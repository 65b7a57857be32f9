"""Experiment tracking (track.*): TensorBoard event files, MLflow runs, resume without duplicate steps, the
doctor and sweeps as one parent run with a child run per variant. Tests needing a tracking package skip
without it; the config and error tests run everywhere."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import cli, cli_subprocess, tiny_args
from fedgap.config import load_config, results_hash
from fedgap.experiment.loop import Experiment
from fedgap.experiment.outputs import read_metrics


def tracked(tiny_idx, *extra: str) -> list[str]:
    return [*tiny_args(tiny_idx), "server.rounds=3", *extra]


def test_tracking_keys_leave_the_results_hash_alone(tmp_path):
    plain = load_config(overrides=["server.rounds=3"])
    with_tracking = load_config(overrides=["server.rounds=3", f"track.tensorboard={tmp_path}", "track.mlflow=true",
                                           "track.experiment=mine"])
    assert results_hash(plain) == results_hash(with_tracking)


def test_a_missing_tracking_package_is_one_line(tiny_idx, tmp_path, capsys, monkeypatch):
    for module, key, extra in (("mlflow", "track.mlflow=true", "mlflow"),
                               ("tensorboard", f"track.tensorboard={tmp_path}/tb", "tensorboard")):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as when not installed
        code, _, err = cli("run", *tracked(tiny_idx, key), "--out", str(tmp_path / module), "--quiet", capsys=capsys)
        assert code == 2
        assert err.strip() == (f"fedgap: error: {key.split('=')[0]}: needs the {module} package; "
                               f"pip install 'fedgap[{extra}]'")
        assert not (tmp_path / module).exists()  # failed before --out was touched


def test_tensorboard_event_files_hold_every_round_and_the_config(tiny_idx, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, tb = tmp_path / "run", tmp_path / "tb"
    cfg = load_config(overrides=tracked(tiny_idx, f"track.tensorboard={tb}", "eval.diagnostics=true"))
    Experiment(cfg, out, show_progress=False).run()
    acc = EventAccumulator(str(tb / "run"))
    acc.Reload()
    rows = read_metrics(out / "metrics.csv")
    scalars = acc.Tags()["scalars"]
    for column in ("test_accuracy", "test_loss", "train_loss", "seconds", "samples", "client_drift",
                   "bn_divergence", "client_acc_mean", "bn_divergence/features.0.1"):
        assert column in scalars, column
        assert [e.step for e in acc.Scalars(column)] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("test_accuracy")] == pytest.approx([float(r["test_accuracy"]) for r in rows])
    assert [e.value for e in acc.Scalars("seconds")] == pytest.approx([float(r["seconds"]) for r in rows], rel=1e-5)
    hparams = acc.PluginTagToContent("hparams")  # the HParams tab: the resolved config as dotted keys
    assert b"data.partition" in hparams["_hparams_/session_start_info"] and b"dirichlet" in \
        hparams["_hparams_/session_start_info"]
    assert "partition: dirichlet" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_mlflow_run_has_params_metrics_per_round_and_artifacts(tiny_idx, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "run"
    cfg = load_config(overrides=tracked(tiny_idx, f"track.mlflow={uri}", "track.experiment=tests"))
    Experiment(cfg, out, show_progress=False, label="mine").run()
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.run_name == "mine" and run.info.status == "FINISHED"
    assert run.data.params["server.rounds"] == "3" and run.data.params["data.partition"] == "dirichlet"
    assert run.data.params["track.mlflow"] == uri
    rows = read_metrics(out / "metrics.csv")
    for key in ("test_accuracy", "train_loss", "seconds", "samples"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3]
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
            [float(r[key]) for r in rows], rel=1e-5)
    assert run.data.metrics["summary.final_test_accuracy"] == pytest.approx(float(rows[-1]["test_accuracy"]))
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == \
        ["config.yaml", "metrics.csv", "summary.json"]


def test_a_resumed_run_continues_the_same_tracked_run_without_duplicate_steps(tiny_idx, tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri, out, tb = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "run", tmp_path / "tb"
    # checkpoint every 2 rounds: a kill after round 3 has logged a round the resumed run computes again
    args = [*tiny_args(tiny_idx), "server.rounds=6", "checkpoint.every=2", f"track.mlflow={uri}",
            f"track.tensorboard={tb}"]
    proc = subprocess.Popen([sys.executable, "-m", "fedgap", "run", *args, "--out", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not ((out / "metrics.csv").exists() and len(read_metrics(out / "metrics.csv")) >= 3):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "summary.json").exists()
    resumed = cli_subprocess("run", "--out", str(out), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fedgap").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same run, continued
    for key in ("test_accuracy", "train_loss", "seconds", "samples"):
        assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, key)) == [1, 2, 3, 4, 5, 6]
    acc = EventAccumulator(str(tb / "run"))
    acc.Reload()  # events from the checkpoint's round on, written before the kill, are purged
    for key in ("test_accuracy", "train_loss", "seconds"):
        assert [e.step for e in acc.Scalars(key)] == [1, 2, 3, 4, 5, 6], key
    rows = read_metrics(out / "metrics.csv")
    assert [e.value for e in acc.Scalars("train_loss")] == pytest.approx([float(r["train_loss"]) for r in rows],
                                                                          rel=1e-5)


def test_tracking_switched_on_at_resume_logs_the_earlier_rounds_too(tiny_idx, tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri, out, tb = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "run", tmp_path / "tb"
    Experiment(load_config(overrides=tiny_args(tiny_idx)), out, show_progress=False).run()  # 2 rounds, untracked
    more = load_config(overrides=[*tiny_args(tiny_idx), "server.rounds=4", f"track.mlflow={uri}",
                                  f"track.tensorboard={tb}"])
    Experiment(more, out, resume=True, show_progress=False).run()
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("fedgap").experiment_id])
    for key in ("test_accuracy", "seconds"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3, 4]
    acc = EventAccumulator(str(tb / "run"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("seconds")] == [1, 2, 3, 4]


def test_sweep_logs_each_point_as_a_child_of_one_parent_run(tiny_idx, tmp_path, capsys):
    """Two grid points in two pool worker processes, each logging its own run."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "sweep"
    code, _, err = cli("sweep", *tiny_args(tiny_idx), "model.norm=batch,group", f"track.mlflow={uri}",
                       "--out", str(out), "--jobs", "2", "--quiet", capsys=capsys)
    assert code == 0, err
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fedgap").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["batch", "group"] and len(runs) == 3
    assert {r.data.tags["fedgap.run_dir"].rsplit("/", 1)[-1] for r in children} == \
        {p.name for p in (out / "runs").iterdir()}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id)) == \
        ["summary.json", "sweep.csv", "sweep.png"]
    assert parent.data.params["sweep.keys"] == "model.norm" and "model.norm" not in parent.data.params


def test_doctor_logs_every_variant_as_a_run_even_from_the_cache(doctored, tmp_path):
    """The doctor's runs reused from its cache (they ran untracked) are logged from their files, under one
    parent run holding the report."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    src, first = doctored
    out = tmp_path / "d"
    shutil.copytree(src, out)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = first.args[first.args.index("doctor") + 1 : first.args.index("--out")]
    again = cli_subprocess("doctor", *args, f"track.mlflow={uri}", "--out", str(out), "--quiet")
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")} == stamps  # the cache still hits
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fedgap").experiment_id])
    [parent] = [r for r in runs if r.info.run_name == "doctor"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.data.tags["fedgap.run_dir"].rsplit("/", 1)[-1] for r in children} == \
        {p.name for p in (out / "runs").iterdir()}
    assert len(runs) == len(children) + 1
    naive = next(r for r in children if r.info.run_name == "naive-s0")
    assert sorted(m.step for m in client.get_metric_history(naive.info.run_id, "test_accuracy")) == [1, 2]
    assert "client_drift" in naive.data.metrics  # the naive run's diagnostics columns
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id)) == \
        ["gap.csv", "gap.md", "recommended.yaml", "report.html", "summary.json"]
    assert parent.data.metrics["final_test_accuracy/naive"] >= 0


@pytest.mark.slow
def test_a_tracked_doctor_logs_each_variant_from_its_worker(tiny_idx, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "d"
    done = cli_subprocess("doctor", *tiny_args(tiny_idx), f"track.mlflow={uri}", f"track.tensorboard={tmp_path}/tb",
                          "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fedgap").experiment_id])
    [parent] = [r for r in runs if r.info.run_name == "doctor"]
    variants = {p.name for p in (out / "runs").iterdir()}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.data.tags["fedgap.run_dir"].rsplit("/", 1)[-1] for r in children} == variants
    assert {p.name for p in (tmp_path / "tb").iterdir()} == variants
