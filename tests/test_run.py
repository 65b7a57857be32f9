"""The round loop end to end through the real CLI on real MNIST (few rounds, few clients)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import FAST, cli, cli_subprocess, tiny_args
from fedgap.config import load_config
from fedgap.experiment.outputs import BASE_COLUMNS, read_metrics

TIME_COLUMNS = {"seconds", "train_seconds"}


def numbers(metrics_path):
    return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in read_metrics(metrics_path)]


def final_state(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["server"]["model"]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_writes_the_promised_files(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = cli("run", *FAST, "server.rounds=2", "eval.every=1", "--out", str(out), "--quiet",
                          capsys=capsys)
    assert code == 0
    assert "final test accuracy" in stdout
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert list(rows[0])[: len(BASE_COLUMNS)] == BASE_COLUMNS
    assert all(0 <= float(r["test_accuracy"]) <= 1 and int(r["samples"]) > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_test_accuracy", "best_test_accuracy", "rounds_completed", "wall_seconds",
                "train_samples_per_second"):
        assert summary[key] is not None
    assert summary["rounds_completed"] == 2
    assert summary["final_test_accuracy"] == pytest.approx(float(rows[-1]["test_accuracy"]), abs=1e-6)
    # the resolved config repeats the run
    again = load_config(out / "config.yaml")
    assert yaml.safe_load((out / "config.yaml").read_text())["server"]["optimizer"] == "sgd"
    assert again.server.rounds == 2 and again.data.num_clients == 100


def test_same_seed_same_numbers_and_weights(tmp_path, capsys):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert cli("run", *FAST, "server.rounds=2", "eval.every=1", "--out", str(out), "--quiet",
                   capsys=capsys)[0] == 0
        runs.append(out)
    assert numbers(runs[0] / "metrics.csv") == numbers(runs[1] / "metrics.csv")
    assert_same_state(final_state(runs[0]), final_state(runs[1]))
    other = tmp_path / "seed1"
    assert cli("run", *FAST, "server.rounds=2", "eval.every=1", "seed=1", "--out", str(other), "--quiet",
               capsys=capsys)[0] == 0
    assert numbers(other / "metrics.csv") != numbers(runs[0] / "metrics.csv")
    started = [json.loads((out / "summary.json").read_text())["initial_model_sha256"] for out in (*runs, other)]
    assert started[0] == started[1] != started[2] and len(started[0]) == 64


def kill_after_round(out, args, round_, timeout=300):
    """Start a run as a subprocess and SIGKILL it once its checkpoint holds ``round_`` rounds."""
    proc = subprocess.Popen([sys.executable, "-m", "fedgap", "run", *args, "--out", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            metrics = out / "metrics.csv"
            if metrics.exists() and len(read_metrics(metrics)) >= round_ and (out / "checkpoint.pt").exists():
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "summary.json").exists()


def check_resume(tmp_path, args, rounds, kill_at):
    full = tmp_path / "full"
    assert cli_subprocess("run", *args, "--out", str(full), "--quiet").returncode == 0
    cut = tmp_path / "cut"
    kill_after_round(cut, args, kill_at)
    done = len(read_metrics(cut / "metrics.csv"))
    assert kill_at <= done < rounds
    resumed = cli_subprocess("run", "--out", str(cut), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert numbers(cut / "metrics.csv") == numbers(full / "metrics.csv")
    assert_same_state(final_state(cut), final_state(full))
    started = [json.loads((out / "summary.json").read_text())["initial_model_sha256"] for out in (cut, full)]
    assert started[0] == started[1]  # a resumed run names the weights it started from, not its checkpoint's


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    check_resume(tmp_path, [*FAST, "server.rounds=4", "eval.every=1"], rounds=4, kill_at=2)


@pytest.mark.slow
def test_default_dirichlet_20_rounds_deterministic_and_resumable(tmp_path):
    """The foundation issue's check: alpha=0.5, 100 clients, 10 per round, 20 rounds, killed after 10."""
    args = ["data.partition=dirichlet", "data.alpha=0.5", "data.num_clients=100", "server.clients_per_round=10",
            "server.rounds=20"]
    check_resume(tmp_path, args, rounds=20, kill_at=10)
    again = tmp_path / "again"
    assert cli_subprocess("run", *args, "--out", str(again), "--quiet").returncode == 0
    assert numbers(again / "metrics.csv") == numbers(tmp_path / "full" / "metrics.csv")


@pytest.mark.slow
def test_centralized_five_epochs_reach_98_percent(tmp_path):
    out = tmp_path / "central"
    done = cli_subprocess("run", "data.partition=central", "server.rounds=5", "--out", str(out), "--quiet")
    assert done.returncode == 0
    assert json.loads((out / "summary.json").read_text())["final_test_accuracy"] >= 0.98


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("run", *FAST, "server.rounds=1", "--out", str(out), "--quiet", capsys=capsys)[0] == 0
    code, _, err = cli("run", *FAST, "server.rounds=1", "--out", str(out), "--quiet", capsys=capsys)
    assert code == 2 and "already holds a finished run" in err
    assert cli("run", *FAST, "server.rounds=1", "--out", str(out), "--quiet", "--overwrite", capsys=capsys)[0] == 0


def test_resume_extends_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("run", *FAST, "server.rounds=1", "--out", str(out), "--quiet", capsys=capsys)[0] == 0
    assert cli("run", "--out", str(out), "--resume", "server.rounds=2", "--quiet", capsys=capsys)[0] == 0
    assert len(read_metrics(out / "metrics.csv")) == 2
    code, _, err = cli("run", "--out", str(out), "--resume", "client.lr=0.1", "--quiet", capsys=capsys)
    assert code == 2 and "config differs" in err


def test_too_few_surviving_clients_stop_with_a_resumable_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    all_clients = "[" + ",".join(str(i) for i in range(10)) + "]"
    args = ["data.num_clients=10", "server.clients_per_round=3", "server.min_clients=2", "server.rounds=3"]
    code, _, err = cli("run", *args, f"engine.fail_clients={all_clients}", "--out", str(out), "--quiet",
                       capsys=capsys)
    assert code == 3
    assert "fewer than server.min_clients=2" in err and "InjectedClientFailure" in err
    assert not (out / "summary.json").exists()


def test_two_processes_never_work_in_one_run_folder(tmp_path, capsys):
    from fedgap.experiment.outputs import RunLock

    out = tmp_path / "run"
    out.mkdir()
    held = RunLock(out)  # as if another fedgap process were running there
    try:
        code, _, err = cli("run", *FAST, "server.rounds=1", "--out", str(out), "--quiet", capsys=capsys)
        assert code == 2 and "another fedgap process is working in this folder" in err
    finally:
        held.release()
    assert cli("run", *FAST, "server.rounds=1", "--out", str(out), "--quiet", capsys=capsys)[0] == 0


def test_a_diverged_run_stops_at_the_first_non_finite_model_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli("run", *FAST, "client.lr=1e12", "server.rounds=6", "--out", str(out), "--quiet",
                       capsys=capsys)
    assert code == 0  # a diverged run is a finished result (the doctor and sweeps rank it), with a warning
    summary = json.loads((out / "summary.json").read_text())
    stopped = summary["diverged_at_round"]
    assert stopped is not None and stopped < 6 and summary["rounds_completed"] == stopped
    rows = read_metrics(out / "metrics.csv")
    assert len(rows) == stopped and rows[-1]["diverged"] == "True" and rows[-1]["test_accuracy"] != ""
    assert "training diverged" in err and "client.lr" in err
    # resuming with more rounds does not train on from NaN weights
    assert cli("run", "--out", str(out), "--resume", "server.rounds=10", "--quiet", capsys=capsys)[0] == 0
    assert len(read_metrics(out / "metrics.csv")) == stopped


def test_a_finite_run_reports_no_divergence(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("run", *FAST, "server.rounds=1", "--out", str(out), "--quiet", capsys=capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["diverged_at_round"] is None
    assert "diverged" not in read_metrics(out / "metrics.csv")[0]


class _RunsCodeWhenUnpickled:
    """A checkpoint entry whose unpickling would create a folder: what a malicious checkpoint.pt could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, tiny_idx):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    args = ["run", *tiny_args(tiny_idx), "server.rounds=1", "--out", str(out), "--quiet"]
    assert cli_subprocess(*args).returncode == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["rows"].append(_RunsCodeWhenUnpickled(marker))
    (out / "summary.json").unlink()
    torch.save(ckpt, out / "checkpoint.pt")
    done = cli_subprocess(*args[:-4], "server.rounds=2", "--out", str(out), "--resume", "--quiet")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "refused" in lines[0] and "checkpoint.pt" in lines[0]
    assert not marker.exists()  # the pickle's call never ran
