"""benchmarks/flower_sim.py, the Flower runner of ``make bench``, does the plain loop's work: the same clients each
round, the same samples, the same model.

Exactness, derived: the ClientApp trains with ``plain_loop.train_client`` at one intra-op thread, after
``plain_loop.seed_client`` (the same batches), from the same global state (float32 arrays travel exactly), and
Flower's FedAvg adds ``array * (n_i / n)`` in client-id order (the runner's strategy sorts the replies) with the
same float32 operations as the plain loop's ``average`` (numpy and torch both round the Python-float weight to
float32 and multiply, then add in the same order). With the plain loop also at one thread every floating-point
entry of the state is equal bit for bit. Not compared: BatchNorm's ``num_batches_tracked``: Flower's FedAvg
averages every array, this integer counter too (a float64 weighted mean), where the plain loop keeps the first
client's; nothing reads it at BatchNorm's default momentum. The server evaluates with torch's default threads and
the plain loop here with one, so the test loss is compared to 1e-5 relative (float32 sums of 200 per-image losses
in another order: about 1e-7 relative); the accuracy, an argmax per image, exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_args
from test_export_flower import simulation_extra_missing


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Ray's daemons and workers stay in the session of the process that
    started them)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.mark.flower
def test_flower_sim_trains_the_plain_loops_clients_and_model(tiny_idx, tmp_path):
    if (why := simulation_extra_missing()) is not None:
        pytest.skip(why)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import plain_loop
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from fedgap.config import load_config
    from fedgap.experiment.loop import sample_clients

    overrides = tiny_args(tiny_idx)  # 10 clients, 3 per round, 2 rounds
    saved = tmp_path / "flower.pt"
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "flower_sim.py"), *overrides,
                             "--save-model", str(saved)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FEDGAP_NO_DOWNLOAD": "1"}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    deadline = time.monotonic() + 20  # ray.shutdown signals its processes; the actors take a moment to exit
    while session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_members(proc.pid) == []  # Ray's processes ended with the run
    result = json.loads(out.strip().splitlines()[-1])

    cfg = load_config(overrides=overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ClientApp trains
    try:
        rows, model = plain_loop.run(cfg, cfg.server.rounds, return_model=True)
    finally:
        torch.set_num_threads(threads)

    flower_rows = result["per_round"]
    assert result["rounds"] == len(flower_rows) == 2
    assert [r["clients"] for r in flower_rows] == [
        sample_clients(cfg.seed, r, cfg.data.num_clients, cfg.server.clients_per_round).tolist() for r in (1, 2)]
    assert [r["samples"] for r in flower_rows] == [r["samples"] for r in rows]
    assert [r["test_accuracy"] for r in flower_rows] == [r["test_accuracy"] for r in rows]
    assert [r["test_loss"] for r in flower_rows] == pytest.approx([r["test_loss"] for r in rows], rel=1e-5)
    flower_state = torch.load(saved, weights_only=True)
    plain_state = model.state_dict()
    assert flower_state.keys() == plain_state.keys()
    compared = 0
    for key, value in plain_state.items():
        if key.endswith("num_batches_tracked"):
            continue  # see the module docstring
        assert torch.equal(flower_state[key], value), key  # bit for bit
        compared += 1
    assert compared > 10


def test_run_engines_reports_flower_sim_skipped_and_the_ratio_against_it(tmp_path, monkeypatch):
    """Without .venv-flower-sim the flower-sim row says why it was skipped (nothing is started); with it, every
    runner's `× flower-sim` is flower-sim's s/round over the runner's."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import run_engines
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    monkeypatch.setattr(run_engines, "SIM_PY", tmp_path / ".venv-flower-sim" / "bin" / "python")
    skipped = run_engines.measure(run_engines.FLOWER, "default", 2, timeout=5)
    assert skipped == {"skipped": ".venv-flower-sim is missing (make bench builds it)"}
    assert run_engines.best_pass([skipped, skipped]) == skipped

    def best(seconds):
        return {"best": {"seconds_per_round": seconds, "train_images_per_second": 1000.0, "startup_seconds": 1.0,
                         "launch_to_ready_seconds": 2.0, "peak_pss_mb": 500.0, "peak_rss_mb": 600.0, "spread": 0.0}}

    machine, flops = {"matmul_gflops_2_threads": 100.0}, {"train_flops_per_image": 5e6}
    text = run_engines.table({"default": {"plain-loop": best(3.0), "flower-sim": {"best": skipped},
                                          "parallel": best(1.5)},
                              "small-batch": {"plain-loop": best(4.0), "flower-sim": best(2.5),
                                              "parallel": best(1.25)}}, machine, flops)
    rows, experiment = {}, None
    for line in text.splitlines():
        if line.startswith("**"):
            experiment = line.split("**")[1]
        elif line.startswith("| "):
            cells = line.split(" | ")
            rows[f"{cells[0].removeprefix('| ')}@{experiment}"] = cells
    assert rows["flower-sim@default"][1] == "skipped: .venv-flower-sim is missing (make bench builds it)"
    assert rows["parallel@default"][-3:-1] == ["2.00×", "-"]  # × plain loop, × flower-sim
    assert rows["parallel@small-batch"][-3:-1] == ["3.20×", "2.00×"]
    assert rows["flower-sim@small-batch"][-3:-1] == ["1.60×", "1.00×"]
