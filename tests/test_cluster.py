"""The doctor on a real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and two worker
nodes, each its own raylet with 1 CPU, loopback only, started and stopped here): the same gap.csv, recommended.yaml
and per-run metrics as the local pool at the same threads per run, also when a worker node is removed mid-rung;
and the one-line errors of a cluster that cannot run the doctor.

Slow (make test-slow): a cluster start-up, a local reference doctor and two doctors on the cluster, about 3-4
minutes on 2 busy cores.
"""

from __future__ import annotations

import csv
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import cli
from procs import descendants, is_loopback, listening_addresses

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

# Rungs at 9 and 12 rounds (the quick preset's first rung is 9): a second rung extends runs from checkpoints that
# travel to the cluster; logit adjustment has 3 candidates, FedBN 1, then one combination step: 8 runs.
REMEDIES = "fedbn,logit_adjust"
TIMING = ("wall_seconds",)


def doctor_args(root: str) -> list[str]:
    return ["data.name=idx", f"data.root={root}", "data.num_clients=10", "server.clients_per_round=3",
            "data.min_samples=5", "server.rounds=12", "eval.every=1", "--remedies", REMEDIES, "--threads", "1",
            "--quiet"]


@contextmanager
def loopback_cluster(workers: int = 2):
    """A head and ``workers`` worker nodes, 1 CPU each, every service on 127.0.0.1 (as ``init_local_ray``)."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cluster_mode, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    try:
        nodes = [cluster.add_node(**node) for _ in range(workers)]
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cluster():
    before = descendants(os.getpid())
    with loopback_cluster() as (c, nodes):
        yield c, nodes
    time.sleep(1.0)
    left = [p for p in descendants(os.getpid()) - before if _alive(p) and _is_ray(p)]
    assert not left, f"Ray processes outlived the cluster: {left}"


@pytest.fixture(scope="module")
def reference(tiny_idx, tmp_path_factory):
    """The local pool's doctor at one thread per run."""
    out = tmp_path_factory.mktemp("local") / "d"
    code, _, err = cli("doctor", *doctor_args(tiny_idx), "--jobs", "2", "--out", str(out))
    assert code == 0, err
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _is_ray(pid: int) -> bool:
    """A Ray daemon or worker (not the local pool's multiprocessing resource tracker, which lives as long as the
    test process does)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"ray" in cmdline and b"resource_tracker" not in cmdline


def gap_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "gap.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(fh)]


def run_metrics(out: Path) -> dict[str, list[dict[str, str]]]:
    """Every cached run's metrics.csv but its timing columns, by run folder name."""
    found = {}
    for f in sorted((out / "runs").glob("*/metrics.csv")):
        with open(f, newline="") as fh:
            found[f.parent.name] = [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(fh)]
    return found


def assert_same_doctor(a: Path, b: Path) -> None:
    assert gap_rows(a) == gap_rows(b)
    assert (a / "recommended.yaml").read_bytes() == (b / "recommended.yaml").read_bytes()
    assert run_metrics(a) == run_metrics(b)  # every run's losses and accuracies, to the 6 digits metrics.csv keeps


def running_tasks(node) -> list[int]:
    """Worker processes of ``node`` running one of the doctor's tasks (Ray titles them ``ray::<function>``).
    Ray's state API would say the same but needs its dashboard (ray[default]), which is not installed here."""
    from fedgap.runs.cluster import TASK_TITLE

    raylet = node.all_processes["raylet"][0].process.pid
    found = []
    for pid in descendants(raylet):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(TASK_TITLE.encode()):
                found.append(pid)
        except OSError:
            continue
    return found


def test_the_doctor_on_three_nodes_equals_the_local_pool(cluster, reference, tiny_idx, tmp_path):
    c, _ = cluster
    out = tmp_path / "d"
    code, _, err = cli("doctor", *doctor_args(tiny_idx), "--cluster", c.address, "--out", str(out))
    assert code == 0, err
    assert_same_doctor(reference, out)
    assert not ray.is_initialized()  # the doctor left the cluster it joined
    addresses = listening_addresses(descendants(os.getpid()))
    assert addresses and all(is_loopback(a) for a in addresses), addresses


def test_a_worker_node_removed_mid_rung_loses_no_finished_run(cluster, reference, tiny_idx, tmp_path):
    """Once the first rung's five runs are in the local cache, the node running a task of the second rung (a run
    extended from its 9-round checkpoint, or FedBN's only candidate) is removed: Ray runs that task again on
    another node from the bytes it was sent, and the doctor ends with the same results; no finished run is redone."""
    c, nodes = cluster
    out = tmp_path / "d"
    seen: dict = {}

    def remove_a_busy_node():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and "removed" not in seen:
            if len(list(out.glob("runs/*/summary.json"))) >= 5:
                for node in list(c.worker_nodes):
                    if running_tasks(node):
                        seen["finished"] = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
                        seen["killed"] = running_tasks(node)
                        c.remove_node(node)
                        seen["removed"] = node
                        return
            time.sleep(0.02)

    watcher = threading.Thread(target=remove_a_busy_node, daemon=True)
    watcher.start()
    code, _, err = cli("doctor", *doctor_args(tiny_idx), "--cluster", c.address, "--out", str(out))
    watcher.join(timeout=5)
    assert code == 0, err
    assert "removed" in seen, "no task of the second rung ran on a worker node"
    assert seen["removed"] in nodes and seen["removed"] not in c.worker_nodes
    assert not any(_alive(p) for p in seen["killed"])
    assert {p: p.stat().st_mtime_ns for p in seen["finished"]} == seen["finished"]  # not redone
    assert_same_doctor(reference, out)


def test_a_node_with_another_fedgap_is_one_line_before_anything_runs(cluster, tiny_idx, tmp_path, capsys,
                                                                    monkeypatch):
    import fedgap

    c, _ = cluster
    real = fedgap.__version__
    monkeypatch.setattr(fedgap, "__version__", "9.9.9")  # this driver's version; the nodes import the real one
    out = tmp_path / "d"
    code, _, err = cli("doctor", *doctor_args(tiny_idx), "--cluster", c.address, "--out", str(out), capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("fedgap: error: --cluster: node 127.0.0.1 (")
    assert f"has fedgap {real} with torch" in lines[0]
    assert "this machine fedgap 9.9.9" in lines[0] and "install the same versions on every node" in lines[0]
    assert not out.exists() and not ray.is_initialized()


@pytest.mark.parametrize(("extra", "message"), [
    (["--gpus-per-run", "0.25"], "--gpus-per-run: 0.25 of a GPU per run, but the Ray cluster has 0 GPUs"),
    (["--threads", "2"], "--threads: 2 CPUs per run, but no node of the Ray cluster has more than 1"),
], ids=["gpus", "threads"])
def test_a_run_no_node_can_hold_is_one_line(cluster, tiny_idx, tmp_path, capsys, extra, message):
    """Ray would wait forever for a node with the resources a task reserves."""
    c, _ = cluster
    out = tmp_path / "d"
    code, _, err = cli("doctor", *doctor_args(tiny_idx), *extra, "--cluster", c.address, "--out", str(out),
                       capsys=capsys)
    assert code == 2 and err.strip() == f"fedgap: error: {message}", err
    assert not out.exists() and not ray.is_initialized()
