"""The benchmark scripts' settings are valid configs (a typo in a row would only show hours into a benchmark)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO
from fedgap.config import load_config


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


paper = load_script("fedavg_paper")


@pytest.mark.parametrize("row", list(paper.ROWS))
def test_every_fedavg_paper_row_is_a_valid_config(row):
    published, overrides, cap = paper.ROWS[row]
    cfg = load_config(overrides=[*paper.COMMON, *overrides, "client.lr=0.1", f"server.rounds={cap}"])
    assert cfg.model.name == "cnn" and cfg.server.clients_per_round == 10 and cfg.eval.stop_at_target
    assert (cfg.server.average is not None) == ("average" in row)


niid = load_script("niid_bench")


@pytest.mark.parametrize("split", list(niid.SPLITS))
@pytest.mark.parametrize("method", list(niid.METHODS))
def test_every_niid_bench_row_is_a_valid_config(split, method):
    cfg = load_config(overrides=[*niid.SETTING, *niid.SPLITS[split][1], *niid.METHODS[method][1]])
    assert (cfg.model.name, cfg.data.num_clients, cfg.server.clients_per_round) == ("simple-cnn", 10, 10)
    assert (cfg.server.rounds, cfg.client.epochs, cfg.client.batch_size, cfg.client.lr) == (50, 10, 64, 0.01)
    assert (cfg.client.momentum, cfg.client.weight_decay, cfg.model.norm) == (0.9, 1e-5, "none")
    assert split in niid.PUBLISHED and method in niid.PUBLISHED[split]


def test_niid_bench_end_to_end_on_the_tiny_set_tunes_mu_on_validation_and_resumes(tiny_idx, tmp_path, capsys):
    args = ["--splits", "c2", "--methods", "fedavg", "fedprox", "--rounds", "1", "--out", str(tmp_path),
            "data.name=idx", f"data.root={tiny_idx}", "client.epochs=1", "engine.threads=1"]
    assert niid.main(args) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    prox = results["c2/fedprox/seed0"]
    assert set(prox["mu_validation"]) == {"0.001", "0.01", "0.1", "1"}
    assert prox["mu"] == max(niid.MU_GRID, key=lambda m: (prox["mu_validation"][f"{m:g}"], -m))
    assert "data.validation" not in prox["command"] and f"server.mu={prox['mu']}" in prox["command"]
    assert all(r["rounds"] == 1 and 0 <= r["best_test_accuracy"] <= 1 for r in results.values())
    assert "| #C=2 | 1 | 96.86 / " in out and (tmp_path / "table.md").read_text() == out
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 6  # fedavg, 4 validation runs of FedProx, the chosen mu on all the data
    assert niid.main(args) == 0  # a second call finds every run finished in the cache
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs
