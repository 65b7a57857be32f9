"""The exported Flower app on Flower's deployment runtime (flwr 1.42): a real ``flower-superlink``, one
``flower-supernode`` per fedgap client and ``flwr run``, each its own process on 127.0.0.1 (tests/flower_deploy.py).

Tolerance, derived as for the simulation proof (tests/test_export_flower.py): both runs execute the same float
operations in the same order. The strategy trains exactly ``sample_clients(seed, round, ...)``; each ClientApp
process runs ``local_update`` with the same seeds on the same rows with one intra-op thread
(``engine.threads=1``); states travel as float32 arrays (exact) and the server aggregates in client-id order
with the loop's own code. So per-round metrics are equal and the final model is equal bit for bit.

Run with ``make test-flower`` (marker ``flower``; a few minutes: every ClientApp is a new process that imports
torch and fedgap, and SuperNodes and the ServerApp poll every 3 s).
"""

from __future__ import annotations

import json
import re
import socket
import time

import pytest
import torch

from conftest import cli, cli_subprocess
from fedgap.experiment.outputs import read_metrics
from fedgap.fl.aggregate import ServerState
from flower_deploy import BIN, Deployment, make_node_key, make_tls
from keras_models import SEED_STYLE
from procs import descendants, is_loopback

pytest.importorskip("flwr", reason="flwr is not installed (pip install 'fedgap[flower]')")
pytestmark = [pytest.mark.flower, pytest.mark.timeout(1800),  # each test waits at most 900 s for its runs
              pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="flower-superlink not installed")]

CLIENTS = 4
SHARED = ["round", "test_accuracy", "test_loss", "train_loss", "samples", "clients", "clients_failed"]


def tiny(root: str, *extra: str) -> list[str]:
    """4 clients, 3 per round, 3 rounds on the tiny IDX set, one intra-op thread (module docstring)."""
    return ["data.name=idx", f"data.root={root}", f"data.num_clients={CLIENTS}", "server.clients_per_round=3",
            "data.min_samples=5", "server.rounds=3", "eval.every=1", "engine.threads=1", *extra]


def export(capsys, out, *args: str) -> None:
    code, _, err = cli("export", "flower", *args, "--out", str(out), capsys=capsys)
    assert code == 0, err


def fedgap_run(app, out) -> None:
    ran = cli_subprocess("run", str(app / "config.yaml"), "--out", str(out), "--quiet")
    assert ran.returncode == 0, ran.stderr[-2000:]


def assert_same_experiment(flower_out, fedgap_out, name: str) -> None:
    """The same initial weights; per-round metrics equal; model.pt (the model fedgap evaluates) equal bit for bit
    to `fedgap run`'s."""
    summary = json.loads((flower_out / "summary.json").read_text())
    started = json.loads((fedgap_out / "summary.json").read_text())["initial_model_sha256"]
    assert summary["initial_model_sha256"] == started, f"{name}: the ServerApp built other initial weights"
    flower_rows = [[r[k] for k in SHARED] for r in read_metrics(flower_out / "metrics.csv")]
    assert flower_rows == [[r[k] for k in SHARED] for r in read_metrics(fedgap_out / "metrics.csv")], name
    flower_state = torch.load(flower_out / "model.pt")
    ckpt = torch.load(fedgap_out / "checkpoint.pt", weights_only=True)
    fedgap_state = ServerState.from_dict(ckpt["server"]).evaluated()
    assert flower_state.keys() == fedgap_state.keys(), name
    for key, value in fedgap_state.items():
        assert torch.equal(flower_state[key], value), (name, key)  # bit for bit
    assert summary["engine"] == "flower" and summary["rounds_completed"] == 3, name


def assert_all_stopped(deployment: Deployment) -> None:
    assert deployment.leftovers() == [], deployment.logs()
    with pytest.raises(OSError):  # nothing listens on the SuperLink's port any more
        socket.create_connection(("127.0.0.1", deployment.port), timeout=2).close()


# ------------------------------------------------------------------------------------------- plain deployment
SETTINGS = {
    "fedavg": [],
    "scaffold": ["server.algorithm=scaffold"],  # the client's control variate c_i stays in context.state
    # the doctor's recommendation on the default setting (README): FedDyn + logit adjustment, running average
    "recommended": ["client.objective=logit_adjust+feddyn", "objective.feddyn.alpha=0.01", "client.lr=0.1",
                    "objective.logit_adjust.tau=1.0", "server.average=9"],
    # a Keras model (the seed's network, Keras defaults): its file is read from the path in config.yaml on every node
    "keras": [f"model.name={SEED_STYLE}"],
}


def test_exported_app_on_a_superlink_and_supernodes_is_the_same_experiment(tiny_idx, tmp_path, capsys):
    """FedAvg, SCAFFOLD, the doctor's recommendation and a Keras model, submitted together to one SuperLink with 4
    SuperNodes."""
    apps = {name: tmp_path / name for name in SETTINGS}
    for name, extra in SETTINGS.items():
        export(capsys, apps[name], *tiny(tiny_idx, *extra))
    with Deployment(tmp_path / "deployment") as deployment:
        deployment.start_superlink()
        for cid in range(CLIENTS):
            deployment.start_supernode(cid, CLIENTS)
        runs = {deployment.submit(apps[name], {"out-dir": str(tmp_path / f"{name}-flower")}): name
                for name in SETTINGS}
        for name in SETTINGS:  # fedgap's own runs while Flower's go
            fedgap_run(apps[name], tmp_path / f"{name}-fedgap")
        listening = deployment.listening()
        finished = deployment.wait_finished(list(runs), timeout=900)
    assert_all_stopped(deployment)
    # the SuperLink's port and each SuperNode's Runtime API port, all on loopback
    assert len(listening) >= 1 + CLIENTS and all(is_loopback(address) for address, _ in listening), listening
    for run_id, name in runs.items():
        assert finished[run_id]["status"] == "finished:completed", (name, finished[run_id])
        assert_same_experiment(tmp_path / f"{name}-flower", tmp_path / f"{name}-fedgap", name)


# ------------------------------------------------------------------------------------------- TLS and node auth
def test_tls_and_supernode_authentication(tiny_idx, tmp_path, capsys):
    """TLS on every SuperLink API and only registered SuperNodes: the run completes with the authorized nodes and
    gives `fedgap run`'s model; a SuperNode with an unregistered key is refused; a SuperNode and a flwr CLI
    without the CA certificate cannot connect. The CLI uses the connection `fedgap export flower` wrote."""
    tls = make_tls(tmp_path / "certs")
    app = tmp_path / "app"
    with Deployment(tmp_path / "deployment", tls=tls, node_auth=True, connection="tls-app") as deployment:
        deployment.start_superlink()
        export(capsys, app, *tiny(tiny_idx), "--name", "tls-app", "--superlink", deployment.address,
               "--root-certificates", str(tls.ca))
        deployment.write_connection((app / "superlink.toml").read_text())  # the exported connection, as a user would
        registered = set()
        for cid in range(CLIENTS):
            private, public = make_node_key(tmp_path / "keys", f"node-{cid}")
            registered.add(deployment.register(public))
            deployment.start_supernode(cid, CLIENTS, key=private)
        private, _ = make_node_key(tmp_path / "keys", "intruder")  # its public key is never registered
        intruder = deployment.start_supernode(0, CLIENTS, name="intruder", key=private, max_wait_seconds=60)
        no_ca = deployment.start_supernode(1, CLIENTS, name="no-ca", root_certificates=False, max_wait_seconds=60)
        run_id = deployment.submit(app, {"out-dir": str(tmp_path / "flower")})
        fedgap_run(app, tmp_path / "fedgap")
        status = deployment.wait_finished([run_id], timeout=900)[run_id]
        nodes = deployment.supernodes()
        # the flwr CLI without the CA certificate (system trust store) cannot reach the SuperLink either
        deployment.write_connection(f'[superlink.tls-app]\naddress = "{deployment.address}"\n')
        cli_without_ca = deployment.flwr("ls", "tls-app", check=False)
        superlink_log = deployment.procs[0].log.read_text(errors="replace")
    assert_all_stopped(deployment)
    assert status["status"] == "finished:completed", status
    assert_same_experiment(tmp_path / "flower", tmp_path / "fedgap", "tls")
    assert {int(n["node-id"]) for n in nodes} == registered and all(n["status"] == "online" for n in nodes), nodes
    assert intruder.popen.returncode not in (0, None) and "Failed to activate SuperNode" in intruder.tail(200)
    assert "No SuperNode found with the given public key" in superlink_log
    assert no_ca.popen.returncode not in (0, None) and "CERTIFICATE_VERIFY_FAILED" in no_ca.tail(200)
    assert cli_without_ca.returncode != 0 and "unavailable" in cli_without_ca.stdout + cli_without_ca.stderr


# ------------------------------------------------------------------------------------------- a lost SuperNode
def wait_for_clientapp(deployment: Deployment, node, timeout: float) -> None:
    """Until a ClientApp process runs below ``node`` (it is training a message)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in descendants(node.popen.pid):
            try:
                if b"flwr-clientapp" in open(f"/proc/{pid}/cmdline", "rb").read():
                    return
            except OSError:
                continue
        deployment.check_alive()
        time.sleep(0.1)
    raise TimeoutError(f"no ClientApp started on {node.name} within {timeout:g} s\n{deployment.logs()}")


def test_a_supernode_lost_mid_run(tiny_idx, tmp_path, capsys):
    """Two runs that train all 4 clients every round; once the first has finished round 1, SuperNode 3 is killed
    (SIGKILL, with its ClientApp) while it trains. The run with server.min_clients=2 goes on with 3 clients from
    round 2 and completes; the run with server.min_clients=4 stops with one line (in whichever round it had
    reached). No round waits longer than reply-timeout-seconds."""
    reply_timeout = 60
    apps = {"goes-on": tmp_path / "goes-on", "stops": tmp_path / "stops"}
    export(capsys, apps["goes-on"], *tiny(tiny_idx, "server.clients_per_round=4", "server.min_clients=2"))
    export(capsys, apps["stops"], *tiny(tiny_idx, "server.clients_per_round=4", "server.min_clients=4"))
    with Deployment(tmp_path / "deployment") as deployment:
        deployment.start_superlink()
        nodes = [deployment.start_supernode(cid, CLIENTS) for cid in range(CLIENTS)]
        runs = {name: deployment.submit(app, {"out-dir": str(tmp_path / f"{name}-flower"),
                                              "reply-timeout-seconds": reply_timeout})
                for name, app in apps.items()}
        metrics = tmp_path / "goes-on-flower" / "metrics.csv"
        deadline = time.monotonic() + 600
        while not (metrics.exists() and len(read_metrics(metrics)) >= 1):  # round 1 done: round 2 is being sent
            assert time.monotonic() < deadline, deployment.logs()
            deployment.check_alive()
            time.sleep(0.2)
        wait_for_clientapp(deployment, nodes[3], timeout=120)
        lost_at = time.monotonic()
        deployment.kill(nodes[3])
        finished = deployment.wait_finished(list(runs.values()), timeout=900)
        after_loss = time.monotonic() - lost_at
        log = deployment.run_log(runs["goes-on"])
        (tmp_path / "goes-on.log").write_text(log)  # the ServerApp's log, for a failing assertion
    assert_all_stopped(deployment)
    goes_on, stops = finished[runs["goes-on"]], finished[runs["stops"]]
    assert goes_on["status"] == "finished:completed", goes_on
    rows = read_metrics(tmp_path / "goes-on-flower" / "metrics.csv")
    assert [(r["round"], r["clients"], r["clients_failed"]) for r in rows] == [
        ("1", "4", "0"), ("2", "3", "1"), ("3", "3", "1")], rows
    assert all(r["test_accuracy"] for r in rows)
    assert "clients [3] did not reply within 60 s" in log or "Node Unavailable" in log, log[-3000:]
    assert stops["status"] == "finished:failed", stops
    assert re.search(r"round [123]: 3 clients replied, fewer than server.min_clients=4 \(", stops["status-details"]), \
        stops["status-details"]
    assert "\n" not in stops["status-details"].strip()
    # two rounds at most lost waiting (round 2 and the next one), plus the rounds themselves: no hang
    assert after_loss < 2 * reply_timeout + 240, after_loss
