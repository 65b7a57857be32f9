"""Your own model and your own data end to end (issue 14): a model file outside the package and 3-channel npz
and folder sets through `fedgap run` and `fedgap doctor` (real CLI processes), the doctor's normalization
remedies on the converted model, every engine on it, and bad inputs exiting 2 with one line and no run files."""

import csv
import json

import pytest
import torch

from conftest import cli, cli_subprocess, own_args
from fedgap.config import load_config
from fedgap.diagnose import variants as V
from fedgap.experiment.loop import Experiment
from fedgap.experiment.outputs import RUN_FILES


def npz_args(own_npz, own_model, *extra):
    return [*own_args(["data.name=npz", f"data.path={own_npz}"], own_model), *extra]


def folder_args(own_folder, own_model, *extra):
    return [*own_args(["data.name=folder", f"data.root={own_folder}"], own_model), *extra]


@pytest.fixture(params=["npz", "folder"])
def own_data_args(request, own_npz, own_folder, own_model):
    """The tiny own setting on the RGB npz file or on the RGB image folder."""
    if request.param == "npz":
        return npz_args(own_npz, own_model)
    return folder_args(own_folder, own_model)


def test_run_own_model_with_groupnorm(tmp_path, own_data_args, own_model):
    out = tmp_path / "run"
    done = cli_subprocess("run", *own_data_args, "model.norm=group", "model.groups=4", "--out", str(out), "--quiet",
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and 0 <= summary["final_test_accuracy"] <= 1
    resolved = load_config(out / "config.yaml")
    assert (resolved.model.name, resolved.model.norm) == (own_model, "group")
    state = torch.load(out / "checkpoint.pt", weights_only=True)["server"]["model"]
    assert not any(k.endswith("running_mean") for k in state)  # the BatchNorm layers were replaced
    assert state["body.1.weight"].shape == (8,)  # by GroupNorm(4, 8): the channels are kept


def test_doctor_quick_on_own_model_and_rgb_data(tmp_path, own_data_args):
    out = tmp_path / "doctor"
    remedies = ["groupnorm", "layernorm", "fedbn", "recalibrate", "logit_adjust"]  # every norm remedy, one label-skew
    done = cli_subprocess("doctor", *own_data_args, "--out", str(out), "--remedies", ",".join(remedies), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gap to centralized training, ranked" in done.stdout
    with open(out / "gap.csv") as fh:
        rows = {r["variant"]: r for r in csv.DictReader(fh)}
    assert {"central", "naive", *remedies} <= set(rows) and (out / "recommended.yaml").exists()
    assert all(r["final_test_accuracy"] for r in rows.values())  # every run finished (none failed)
    assert float(rows["central"]["final_test_accuracy"]) > 0.5  # learnable: well above chance (1/3)
    assert (out / "report.html").stat().st_size > 0 and (out / "summary.json").exists()


def quiet_run(args):
    exp = Experiment(load_config(overrides=[*args, "engine.threads=1"]), None, show_progress=False)
    return exp, exp.run()


@pytest.mark.parametrize("remedy", [r for r in V.REMEDIES if r.cause == V.NORMALIZATION], ids=lambda r: r.key)
def test_every_normalization_remedy_runs_on_the_own_model(own_npz, own_model, remedy):
    exp, summary = quiet_run(npz_args(own_npz, own_model, *remedy.overrides, "model.groups=4"))
    assert summary["rounds_completed"] == 2 and summary["final_test_accuracy"] is not None
    has_bn = any(k.endswith("running_mean") for k in exp.server.model)
    assert has_bn == (exp.cfg.model.norm == "batch")
    if remedy.key == "fedbn":
        assert exp.server.clients  # clients keep their own BatchNorm layers


@pytest.mark.parametrize("engine", ["vectorized", "parallel"])
def test_engines_agree_on_the_own_model(own_folder, own_model, engine):
    base = folder_args(own_folder, own_model, "client.augment=true", "client.batch_size=8")
    seq, _ = quiet_run(base)
    other, _ = quiet_run([*base, f"engine.name={engine}", "engine.workers=1", "engine.start_method=spawn"])
    for k, v in seq.server.model.items():
        if v.is_floating_point():
            assert torch.allclose(v, other.server.model[k], rtol=1e-3, atol=3e-4), k


BAD_FACTORY = """
from torch import nn
def make(num_classes, in_channels, image_size):
    raise RuntimeError('weights missing')
def ten(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size[0] * image_size[1], 10))
"""


@pytest.fixture
def bad_inputs(tmp_path, own_npz, own_model):
    import numpy as np

    (tmp_path / "raises.py").write_text(BAD_FACTORY)
    bad_npz = tmp_path / "bad.npz"
    with np.load(own_npz) as z:
        np.savez(bad_npz, x_train=z["x_train"], y_train=z["y_train"], x_test=z["x_test"])
    npz = ["data.name=npz", f"data.path={own_npz}"]
    return {
        "missing file": ([*npz, f"model.name={tmp_path}/nope.py:make"], "nope.py' not found"),
        "missing function": ([*npz, f"model.name={own_model}x"], "has no function 'makex'"),
        "factory raises": ([*npz, f"model.name={tmp_path}/raises.py:make"], "raised RuntimeError: weights missing"),
        "wrong logits": ([*npz, f"model.name={tmp_path}/raises.py:ten"], "gives output (2, 10) for a batch of 2 "
                         "images, expected logits (2, 3)"),
        "groups": ([*npz, f"model.name={own_model}", "model.norm=group", "model.groups=3"],
                   "model.groups: 3 does not divide the 8 channels of layer 'body.1'"),
        "bad npz": (["data.name=npz", f"data.path={bad_npz}", f"model.name={own_model}"], "missing array(s) y_test"),
        "no folder": (["data.name=folder", f"data.root={tmp_path}/none", f"model.name={own_model}"], "not a folder"),
    }


@pytest.mark.parametrize("command", ["run", "doctor"])
@pytest.mark.parametrize("case", ["missing file", "missing function", "factory raises", "wrong logits", "groups",
                                  "bad npz", "no folder"])
def test_bad_model_or_data_exits_2_with_one_line_and_no_run_files(tmp_path, capsys, bad_inputs, command, case):
    args, message = bad_inputs[case]
    out = tmp_path / "out"
    code, _, err = cli(command, *args, "data.num_clients=6", "server.clients_per_round=3", "data.min_samples=3",
                       "--out", str(out), capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and lines[0].startswith("fedgap: error:"), err
    assert not out.exists() or not any((out / f).exists() for f in (*RUN_FILES, "gap.csv", "runs"))


def test_real_process_bad_factory_exits_2(tmp_path, own_npz):
    (tmp_path / "raises.py").write_text(BAD_FACTORY)
    done = cli_subprocess("run", "data.name=npz", f"data.path={own_npz}", f"model.name={tmp_path}/raises.py:make",
                          "data.num_clients=6", "server.clients_per_round=3", "data.min_samples=3",
                          "--out", str(tmp_path / "out"), timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"fedgap: error: model.name: {tmp_path}/raises.py:make raised RuntimeError: weights missing"]
