"""``fedgap export flower``: the app's files, what is refused, and the proof that the exported app is the same
experiment: run in Flower's simulation engine, it gives the same per-round numbers and final model as
``fedgap run`` of its config.

Tolerance, derived: both runs execute the same float operations in the same order. The clients are the same
(the strategy trains exactly ``sample_clients(seed, round, ...)``), each client runs ``local_update`` with the
same seeds on the same rows, states travel as float32 arrays (exact), and the server closes each round with the
loop's own public round API (``Experiment.finish_round``: aggregation in client-id order). With one intra-op
thread on both sides (``engine.threads=1``: fedgap's sequential engine and Flower's Ray actors alike) every kernel
reduces in the same order, so the
difference is zero: the test asserts bit-for-bit equal states and equal metrics. With more threads on one side
parallel reductions add in another order (about 1e-7 relative per operation, < 1e-3 absolute after three rounds
here, see tests/test_ray_engine.py), which can move a test accuracy by a prediction or two.
"""

from __future__ import annotations

import ast
import json
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, cli, cli_subprocess
from fedgap.config import load_config
from fedgap.data.datasets import load_dataset
from fedgap.data.partition import partition_for
from fedgap.experiment.outputs import read_metrics
from fedgap.export.flower import PACKAGE, load_partition
from fedgap.fl.aggregate import ServerState


def tiny(root: str, *extra: str) -> list[str]:
    """6 clients, 4 per round, 3 rounds on the tiny IDX set; one intra-op thread (see the module docstring)."""
    return ["data.name=idx", f"data.root={root}", "data.num_clients=6", "server.clients_per_round=4",
            "data.min_samples=5", "server.rounds=3", "eval.every=1", "engine.threads=1", *extra]


def test_export_and_flower_have_help(capsys):
    code, out, _ = cli("export", "--help", capsys=capsys)
    assert code == 0 and "flower" in out
    code, out, _ = cli("export", "flower", "--help", capsys=capsys)
    assert code == 0 and "--out" in out and "partition" in out


def test_export_writes_the_app_config_and_partition(tiny_idx, tmp_path, capsys):
    out = tmp_path / "app"
    code, _, err = cli("export", "flower", *tiny(tiny_idx, "server.algorithm=scaffold", "track.mlflow=true"),
                       "engine.name=parallel", "--out", str(out), capsys=capsys)
    assert code == 0, err
    cfg = load_config(overrides=tiny(tiny_idx, "server.algorithm=scaffold"))
    exported = load_config(out / "config.yaml")
    assert exported.engine.name == "sequential" and not exported.track.mlflow  # Flower is the engine
    assert exported.client == cfg.client and exported.server == cfg.server and exported.model == cfg.model
    assert exported.data == cfg.data and exported.seed == cfg.seed
    parts = load_partition(out / "partition.npz")
    expected = partition_for(cfg.data, load_dataset("idx", tiny_idx).train_y.numpy(), cfg.seed)
    assert sorted(parts) == list(range(6)) and all(np.array_equal(parts[i], p) for i, p in enumerate(expected))
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((out / "pyproject.toml").read_text())
    app = project["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": f"{PACKAGE}.server_app:app", "clientapp": f"{PACKAGE}.client_app:app"}
    assert app["config"]["config-file"] == str((out / "config.yaml").resolve())
    assert any(d.startswith("fedgap") for d in project["project"]["dependencies"])
    assert "flwr>=1.42,<1.43" in project["project"]["dependencies"]  # base flwr: a deployment needs no Ray
    for name in ("client_app.py", "server_app.py"):
        ast.parse((out / PACKAGE / name).read_text())
    assert "@app.train()" in (out / PACKAGE / "client_app.py").read_text()
    assert "@app.main()" in (out / PACKAGE / "server_app.py").read_text()


@pytest.mark.parametrize("setting, first_words", [
    ("model.norm_policy=recalibrate", "model.norm_policy: recalibrate cannot be exported to Flower"),
    ("eval.stop_at_target=true", "eval.stop_at_target: cannot be exported to Flower"),
])
def test_what_cannot_be_exported_is_refused_in_one_line(tiny_idx, tmp_path, setting, first_words):
    out = tmp_path / "app"
    done = cli_subprocess("export", "flower", *tiny(tiny_idx, setting), "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.startswith(f"fedgap: error: {first_words}") and done.stderr.count("\n") == 1
    assert not out.exists()


def one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fedgap: error:") and "Traceback" not in err, err
    return lines[0]


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_refuses_a_folder_that_is_not_an_earlier_export(tiny_idx, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "README.md").write_text("my readme")  # named like one of the app's files
    before = snapshot(out)
    line = one_error_line(*cli("export", "flower", *tiny(tiny_idx), "--out", str(out), capsys=capsys)[::2])
    assert "not empty and not an earlier fedgap export" in line and "--overwrite" in line
    assert snapshot(out) == before  # nothing written, nothing replaced
    # --overwrite writes the app into it: files named like the app's are replaced, the others kept
    assert cli("export", "flower", *tiny(tiny_idx), "--out", str(out), "--overwrite", capsys=capsys)[0] == 0
    assert (out / "notes.txt").read_text() == "my notes" and (out / "README.md").read_text() != "my readme"
    assert load_config(out / "config.yaml").server.rounds == 3


def test_export_replaces_an_earlier_export_and_keeps_other_files(tiny_idx, tmp_path, capsys):
    out = tmp_path / "app"
    assert cli("export", "flower", *tiny(tiny_idx), "--out", str(out), capsys=capsys)[0] == 0
    (out / "flower-run").mkdir()
    (out / "flower-run" / "metrics.csv").write_text("results of a run")
    (out / PACKAGE / "__pycache__").mkdir()  # what importing the app leaves
    assert cli("export", "flower", *tiny(tiny_idx, "server.rounds=4"), "--out", str(out), capsys=capsys)[0] == 0
    assert load_config(out / "config.yaml").server.rounds == 4  # the earlier export's files are replaced
    assert (out / "flower-run" / "metrics.csv").read_text() == "results of a run"  # the rest is left alone


@pytest.mark.parametrize("edit", ["fedgap_app/client_app.py", "superlink.toml"])
def test_export_refuses_an_earlier_export_edited_since(tiny_idx, tmp_path, capsys, edit):
    out = tmp_path / "app"
    assert cli("export", "flower", *tiny(tiny_idx), "--out", str(out), capsys=capsys)[0] == 0
    (out / edit).write_text((out / edit).read_text() + "# my change\n")
    before = snapshot(out)
    line = one_error_line(*cli("export", "flower", *tiny(tiny_idx, "server.rounds=4"), "--out", str(out),
                               capsys=capsys)[::2])
    assert f"'{edit}' was changed since it was exported; pass --overwrite" in line
    assert snapshot(out) == before
    assert cli("export", "flower", *tiny(tiny_idx), "--out", str(out), "--overwrite", capsys=capsys)[0] == 0
    assert "# my change" not in (out / edit).read_text()


def test_export_writes_the_superlink_connection(tiny_idx, tmp_path, capsys):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    out = tmp_path / "app"
    assert cli("export", "flower", *tiny(tiny_idx), "--out", str(out), "--name", "demo", "--superlink",
               "superlink.example:9000", "--root-certificates", str(ca), capsys=capsys)[0] == 0
    entry = tomllib.loads((out / "superlink.toml").read_text())["superlink"]["demo"]
    assert entry == {"address": "superlink.example:9000", "root-certificates": str(ca.resolve())}
    out2 = tmp_path / "insecure"
    assert cli("export", "flower", *tiny(tiny_idx), "--out", str(out2), capsys=capsys)[0] == 0
    assert tomllib.loads((out2 / "superlink.toml").read_text())["superlink"]["insecure"] == {
        "address": "127.0.0.1:8000", "insecure": True}
    config = tomllib.loads((out2 / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config["out-dir"] == str((out2 / "flower-run").resolve()) and config["reply-timeout-seconds"] == 600


@pytest.mark.parametrize("option, value, message", [
    ("--root-certificates", "missing.pem", "--root-certificates '{tmp}/missing.pem': cannot be read"),
    ("--root-certificates", "notes.txt", "--root-certificates '{tmp}/notes.txt': not a PEM certificate"),
    ("--superlink", "localhost", "--superlink 'localhost': expected HOST:PORT"),
])
def test_export_connection_settings_are_checked_in_one_line(tiny_idx, tmp_path, capsys, option, value, message):
    (tmp_path / "notes.txt").write_text("not a certificate")
    arg = str(tmp_path / value) if option == "--root-certificates" else value
    out = tmp_path / "app"
    line = one_error_line(*cli("export", "flower", *tiny(tiny_idx), "--out", str(out), option, arg,
                               capsys=capsys)[::2])
    assert message.format(tmp=tmp_path) in line
    assert not out.exists()


def test_exported_pyproject_is_a_valid_flower_app(tiny_idx, tmp_path, capsys):
    pytest.importorskip("flwr", reason="flwr is not installed (pip install 'fedgap[flower]')")
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from flwr.common.config import validate_config

    out = tmp_path / "app"
    assert cli("export", "flower", *tiny(tiny_idx), "--out", str(out), capsys=capsys)[0] == 0
    sys.path.insert(0, str(out))
    try:
        ok, errors, _ = validate_config(tomllib.loads((out / "pyproject.toml").read_text()), check_module=True,
                                        project_dir=out)
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m.startswith(PACKAGE)]:
            del sys.modules[name]
    assert ok, errors


SHARED = ["round", "test_accuracy", "test_loss", "train_loss", "samples", "clients", "clients_failed"]


class OnlineNodes:
    """The one thing FedgapStrategy.configure_train asks of Flower's Grid: the nodes the SuperLink lists online."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


@pytest.mark.parametrize("min_clients", [2, 3])
def test_strategy_counts_lost_clients_as_failed_like_fedgap_run(tiny_idx, tmp_path, capsys, min_clients):
    """Round 1 samples clients [1, 2, 3, 4]: 1 and 2 reply, 3's reply never comes (its SuperNode was lost after
    the round was sent), 4's SuperNode is no longer online (not sent anything). With server.min_clients=2 the
    round aggregates 1 and 2 exactly as `fedgap run` does when 3 and 4 fail (engine.fail_clients), bit for bit;
    with 3 the run stops with one line that says what happened."""
    pytest.importorskip("flwr", reason="flwr is not installed (pip install 'fedgap[flower]')")
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedgap.errors import FedgapError
    from fedgap.export.flower_app import FedgapStrategy, client_train, to_record, to_state

    app = tmp_path / "app"
    extra = ("server.rounds=1", f"server.min_clients={min_clients}")
    assert cli("export", "flower", *tiny(tiny_idx, *extra), "--out", str(app), capsys=capsys)[0] == 0
    from flwr.supercore.task_identity import TaskIdentity

    threads = torch.get_num_threads()  # the ClientApp code sets one thread (engine.threads=1) in this process
    # what Flower's runtime sets in a ServerApp process before messages are made (restored below)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    try:
        strategy = FedgapStrategy(load_config(app / "config.yaml"), reply_timeout_seconds=30)
        strategy.nodes = {c: 100 + c for c in range(6)}
        online = OnlineNodes(100 + c for c in range(6) if c != 4)
        messages = strategy.configure_train(1, to_record(strategy.exp.server.model), ConfigRecord(), online)
        assert sorted(int(m.content["config"]["client-id"]) for m in messages) == [1, 2, 3]  # 4: not online
        run_config = {"config-file": str(app / "config.yaml"), "partition-file": str(app / "partition.npz")}
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what Grid.push_messages does
            cid = int(msg.content["config"]["client-id"])
            if cid != 3:
                context = Context(0, msg.metadata.dst_node_id, {"partition-id": cid}, RecordDict(), run_config)
                replies.append(client_train(msg, context, app))
        if min_clients == 3:
            with pytest.raises(FedgapError) as raised:
                strategy.aggregate_train(1, replies)
            assert str(raised.value) == ("round 1: 2 clients replied, fewer than server.min_clients=3 (1 did not "
                                         "reply within 30 s, 1 on no online SuperNode)")
            return
        arrays, _ = strategy.aggregate_train(1, replies)
    finally:
        torch.set_num_threads(threads)
        TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None
    last = strategy.exp.rows[-1]
    assert last["clients"] == 2 and last["clients_failed"] == 2
    ran = cli_subprocess("run", str(app / "config.yaml"), "engine.fail_clients=[3,4]", "--out",
                         str(tmp_path / "fedgap"), "--quiet")
    assert ran.returncode == 0, ran.stderr[-2000:]
    row = read_metrics(tmp_path / "fedgap" / "metrics.csv")[0]
    assert (row["clients"], row["clients_failed"], int(row["samples"])) == ("2", "2", last["samples"])
    assert float(row["train_loss"]) == pytest.approx(last["train_loss"], rel=1e-5)  # csv keeps 6 digits
    fedgap_state = torch.load(tmp_path / "fedgap" / "checkpoint.pt", weights_only=True)["server"]["model"]
    for key, value in to_state(arrays).items():
        assert torch.equal(value, fedgap_state[key]), key  # bit for bit


def simulation_extra_missing() -> str | None:
    """Why this environment cannot run Flower's simulation engine as flwr pins it (None if it can): a
    requirement of the ``flwr[simulation]`` extra (its exact Ray) missing or at another version."""
    from importlib.metadata import PackageNotFoundError, requires, version

    try:
        lines = requires("flwr") or []
    except PackageNotFoundError:
        return "flwr is not installed (pip install 'fedgap[flower-simulation]')"
    from packaging.requirements import Requirement  # a dependency of flwr

    for line in lines:
        req = Requirement(line)
        if req.marker is None or not req.marker.evaluate({"extra": "simulation"}) or req.marker.evaluate({"extra": ""}):
            continue  # not a requirement of the simulation extra on this Python
        needs = f"flwr[simulation] needs {req.name}{req.specifier} (make test-flower runs it in .venv-flower-sim)"
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            return f"{req.name} is not installed: {needs}"
        if not req.specifier.contains(installed, prereleases=True):
            return f"{req.name} {installed} is installed: {needs}"
    return None


@pytest.mark.flower
def test_exported_app_in_flower_simulation_is_the_same_experiment(tiny_idx, tmp_path, capsys):
    """FedAvg, SCAFFOLD (client control variates in context.state), FedBN with a FedYogi server (local norm
    layers in context.state, server optimizer state), logit adjustment + FedBN, and logit adjustment + FedDyn
    with the client lr decay and the server's running average: Flower's simulation against `fedgap run`,
    3 rounds. Runs where flwr[simulation] is installed as flwr pins it (make test-flower: .venv-flower-sim)."""
    if (why := simulation_extra_missing()) is not None:
        pytest.skip(why)
    settings = {"fedavg": [], "scaffold": ["server.algorithm=scaffold"],
                "fedbn-yogi": ["server.algorithm=fedbn", "server.optimizer=yogi"],
                # the doctor's recommendation on the default setting: logit adjustment with the client's label
                # prior (computed from its own partition inside local_update) + FedBN
                "recommended": ["client.objective=logit_adjust", "model.norm_policy=local"],
                # a joined objective, the client lr decay and the server's running average of the round models
                "averaged": ["client.objective=logit_adjust+feddyn", "client.lr_decay=0.9", "server.average=1"]}
    apps = {}
    for name, extra in settings.items():
        apps[name] = tmp_path / name
        assert cli("export", "flower", *tiny(tiny_idx, *extra), "--out", str(apps[name]), capsys=capsys)[0] == 0
        ran = cli_subprocess("run", str(apps[name] / "config.yaml"), "--out", str(tmp_path / f"{name}-fedgap"),
                             "--quiet")
        assert ran.returncode == 0, ran.stderr[-2000:]
    import subprocess

    sim = subprocess.run([sys.executable, str(REPO / "tests" / "flower_sim.py"), "6", *map(str, apps.values())],
                         capture_output=True, text=True, timeout=900)
    assert sim.returncode == 0, sim.stderr[-4000:]
    listening = json.loads(sim.stdout.strip().splitlines()[-1].removeprefix("LISTENING "))
    assert listening and set(listening) <= {"127.0.0.1", "::ffff:7f00:1", "::1"}, listening  # loopback only

    for name in settings:
        flower_rows = read_metrics(apps[name] / "flower-run" / "metrics.csv")
        fedgap_rows = read_metrics(tmp_path / f"{name}-fedgap" / "metrics.csv")
        assert [[r[k] for k in SHARED] for r in flower_rows] == [[r[k] for k in SHARED] for r in fedgap_rows], name
        flower_state = torch.load(apps[name] / "flower-run" / "model.pt")
        ckpt = torch.load(tmp_path / f"{name}-fedgap" / "checkpoint.pt", weights_only=True)
        # model.pt is the model fedgap evaluates: the running average under server.average
        fedgap_state = ServerState.from_dict(ckpt["server"]).evaluated()
        assert flower_state.keys() == fedgap_state.keys()
        for key, value in fedgap_state.items():
            assert torch.equal(flower_state[key], value), (name, key)  # bit for bit
        summary = json.loads((apps[name] / "flower-run" / "summary.json").read_text())
        assert summary["rounds_completed"] == 3 and summary["engine"] == "flower"
