"""The seed's Keras model end to end (issue 23): `fedgap run` and `fedgap doctor` through the real CLI with
BatchNorm and with GroupNorm, resume after an interruption equal to an uninterrupted run, the parallel engine equal
to the sequential one, and `fedgap export keras` back to a .keras file that Keras opens (torch backend here, JAX
in a slow test)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedgap.models.keras_backend import use_torch_backend

use_torch_backend()
keras = pytest.importorskip("keras")

from conftest import cli, cli_subprocess, tiny_args  # noqa: E402
from fedgap.config import load_config  # noqa: E402
from fedgap.data.datasets import load_dataset  # noqa: E402
from fedgap.experiment.loop import Experiment  # noqa: E402
from fedgap.experiment.outputs import read_metrics  # noqa: E402
from keras_models import SEED_STYLE  # noqa: E402


def seed_style(root: str, *extra: str) -> list[str]:
    return [*tiny_args(root), f"model.name={SEED_STYLE}", *extra]


@pytest.fixture(scope="module")
def keras_run(tiny_idx, tmp_path_factory):
    """`fedgap run` of the seed-style Keras model (BatchNorm, Keras defaults) through the real CLI."""
    out = tmp_path_factory.mktemp("keras_run") / "run"
    done = cli_subprocess("run", *seed_style(tiny_idx), "--out", str(out), "--quiet", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_run_with_batchnorm_through_the_cli(keras_run):
    summary = json.loads((keras_run / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and 0 <= summary["final_test_accuracy"] <= 1
    state = torch.load(keras_run / "checkpoint.pt", weights_only=True)["server"]["model"]
    assert "batch_normalization.moving_variance" in state and "dense.kernel" in state


def test_run_with_groupnorm_through_the_cli(tiny_idx, tmp_path, capsys):
    out = tmp_path / "gn"
    code, _, err = cli("run", *seed_style(tiny_idx, "model.kwargs.use_groupnorm=true"), "--out", str(out), "--quiet",
                       capsys=capsys)
    assert code == 0, err
    state = torch.load(out / "checkpoint.pt", weights_only=True)["server"]["model"]
    assert "group_normalization.gamma" in state and not any("moving" in k for k in state)


def test_export_keras_writes_the_trained_model_with_its_softmax(keras_run, tiny_idx, tmp_path, capsys):
    out = tmp_path / "model.keras"
    code, _, err = cli("export", "keras", str(keras_run), "--out", str(out), capsys=capsys)
    assert code == 0 and "Keras model written to" in err and "mean (0.1" in err, err
    loaded = keras.models.load_model(out)
    data = load_dataset("idx", tiny_idx)
    probs = keras.ops.convert_to_numpy(loaded(data.test_x.permute(0, 2, 3, 1), training=False))
    assert np.allclose(probs.sum(1), 1, atol=1e-5)  # the softmax is back
    accuracy = float((probs.argmax(1) == data.test_y.numpy()).mean())
    summary = json.loads((keras_run / "summary.json").read_text())
    assert accuracy == pytest.approx(summary["final_test_accuracy"], abs=1 / len(probs) + 1e-9)
    # an existing file is kept unless --overwrite
    code, _, err = cli("export", "keras", str(keras_run), "--out", str(out), capsys=capsys)
    assert code == 2 and err.strip().splitlines() == [f"fedgap: error: --out '{out}': exists; pass --overwrite to "
                                                      "replace it"]
    code, _, err = cli("export", "keras", str(keras_run), "--out", str(out), "--overwrite", capsys=capsys)
    assert code == 0, err


def test_export_keras_uses_the_running_average_under_server_average(tiny_idx, tmp_path, capsys):
    run = tmp_path / "avg"
    exp = Experiment(load_config(overrides=seed_style(tiny_idx, "server.average=1", "engine.threads=1")), run,
                     show_progress=False)
    exp.run()
    code, _, err = cli("export", "keras", str(run), "--out", str(tmp_path / "avg.keras"), capsys=capsys)
    assert code == 0 and "running average" in err, err
    loaded = keras.models.load_model(tmp_path / "avg.keras")
    kernel = keras.ops.convert_to_numpy(loaded.get_layer("dense").kernel)
    assert np.array_equal(kernel, exp.server.evaluated()["dense.kernel"].numpy())
    assert not np.array_equal(kernel, exp.server.model["dense.kernel"].numpy())


def test_export_keras_refuses_a_torch_model(tiny_idx, tmp_path, capsys):
    run = tmp_path / "torch"
    Experiment(load_config(overrides=[*tiny_args(tiny_idx), "server.rounds=1"]), run, show_progress=False).run()
    code, _, err = cli("export", "keras", str(run), "--out", str(tmp_path / "m.keras"), capsys=capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"fedgap: error: RUN_DIR '{run}': model.name=mobilenet-like is a torch model; only Keras models export to "
        "Keras"]
    assert not (tmp_path / "m.keras").exists()


def test_doctor_quick_on_the_keras_model(tiny_idx, tmp_path):
    out = tmp_path / "doctor"
    # the Keras model rebuilt with GroupNormalization; FedBN on its BatchNorm; a momentum override of its lagging
    # running statistics (Keras' momentum=0.99 is 0.01 in torch's convention)
    remedies = ["groupnorm", "fedbn", "bn_momentum"]
    done = cli_subprocess("doctor", *seed_style(tiny_idx), "--out", str(out), "--remedies", ",".join(remedies),
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "gap.csv") as fh:
        rows = {r["variant"]: r for r in csv.DictReader(fh)}
    assert {"central", "naive", *remedies} <= set(rows) and (out / "recommended.yaml").exists()
    assert all(r["final_test_accuracy"] for r in rows.values())  # every run finished
    recommended = load_config(out / "recommended.yaml")
    assert recommended.model.name == SEED_STYLE
    # the naive run's diagnostics read the Keras model's BatchNorm layers (statistics distance, batch-statistics mode)
    (naive,) = (out / "runs").glob("naive-s0-*")
    last = read_metrics(naive / "metrics.csv")[-1]
    assert float(last["train_mode_accuracy"]) >= 0 and float(last["bn_divergence[batch_normalization_4]"]) > 0
    # the report names the BatchNorm settings Keras gave the model, and what the override measured against them
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["bn_momentum"] == [pytest.approx(0.01)] * 5 and summary["model"]["bn_eps"] == \
        [pytest.approx(1e-3)] * 5
    lag = next(f for f in summary["diagnosis"] if "momentum 0.01, eps 0.001" in f["text"])
    assert "Measured here: with model.bn_momentum=" in lag["text"]
    assert rows["bn_momentum"]["chosen"] in ("model.bn_momentum=0.1", "model.bn_momentum=0.3")


def quiet(args: list[str], out=None, **kwargs) -> Experiment:
    exp = Experiment(load_config(overrides=[*args, "engine.threads=1"]), out, show_progress=False, **kwargs)
    exp.run()
    return exp


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tiny_idx, tmp_path):
    args = seed_style(tiny_idx, "server.rounds=3", "model.kwargs.use_groupnorm=false")
    whole = quiet(args, tmp_path / "whole")
    quiet([*args, "server.rounds=1"], tmp_path / "cut")  # a run stopped after round 1 (its checkpoint)
    resumed = Experiment(load_config(overrides=[*args, "engine.threads=1"]), tmp_path / "cut", resume=True,
                         show_progress=False)
    resumed.run()
    assert resumed.round == whole.round == 3
    assert all(torch.equal(whole.server.model[k], resumed.server.model[k]) for k in whole.server.model)
    assert [r["test_accuracy"] for r in whole.rows] == [r["test_accuracy"] for r in resumed.rows]


def test_the_parallel_engine_equals_the_sequential_one(tiny_idx):
    """Both run every client with one intra-op thread, so the same kernels reduce in the same order: equal. The
    worker is spawned: a fresh process that imports the user's file and Keras and builds the model itself."""
    args = seed_style(tiny_idx, "model.norm_policy=recalibrate")
    seq = quiet(args)
    par = quiet([*args, "engine.name=parallel", "engine.workers=1", "engine.start_method=spawn"])
    assert all(torch.equal(seq.server.model[k], par.server.model[k]) for k in seq.server.model)
    assert [r["test_accuracy"] for r in seq.rows] == [r["test_accuracy"] for r in par.rows]


@pytest.mark.slow
def test_the_exported_file_opens_under_jax(keras_run, tiny_idx, tmp_path):
    pytest.importorskip("jax")
    out = tmp_path / "model.keras"
    done = cli_subprocess("export", "keras", str(keras_run), "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr
    data = load_dataset("idx", tiny_idx)
    x = data.test_x[:20].permute(0, 2, 3, 1).numpy()
    np.save(tmp_path / "x.npy", x)
    script = ("import sys, numpy as np, keras; m = keras.models.load_model(sys.argv[1]); "
              "print(keras.backend.backend()); np.save(sys.argv[3], np.asarray(m.predict(np.load(sys.argv[2]), "
              "verbose=0)))")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    done = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "x.npy"), str(tmp_path / "p.npy")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "jax", done.stderr[-2000:]
    theirs = np.load(tmp_path / "p.npy")
    ours = keras.ops.convert_to_numpy(keras.models.load_model(out)(x, training=False))
    assert np.allclose(theirs, ours, atol=1e-5)  # float32 on both backends: a few ulps of probabilities


@pytest.mark.slow
def test_the_ray_engine_equals_the_sequential_one(tiny_idx):
    """Ray actors build the Keras model from the config themselves; one thread each, as the sequential run."""
    pytest.importorskip("ray")
    args = seed_style(tiny_idx)
    seq = quiet(args)
    ray = quiet([*args, "engine.name=ray", "engine.address=local"])
    assert all(torch.equal(seq.server.model[k], ray.server.model[k]) for k in seq.server.model)
    assert [r["test_accuracy"] for r in seq.rows] == [r["test_accuracy"] for r in ray.rows]


@pytest.mark.slow
def test_keras_imported_with_jax_first_is_one_line(tiny_idx, tmp_path):
    """A process that imported Keras on JAX before fedgap: fedgap cannot switch it and says so in one line."""
    pytest.importorskip("jax")
    script = ("import sys, keras; from fedgap.cli import main; main(sys.argv[1:])")
    env = {**os.environ, "KERAS_BACKEND": "jax", "FEDGAP_NO_DOWNLOAD": "1"}
    done = subprocess.run([sys.executable, "-c", script, "run", *seed_style(tiny_idx), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "fedgap: error: model.name: Keras was imported with the jax backend before fedgap could set "
        "KERAS_BACKEND=torch; set KERAS_BACKEND=torch before importing keras"], done.stderr[-2000:]
