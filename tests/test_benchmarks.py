"""The benchmark scripts' settings are valid configs (a typo in a row would only show hours into a benchmark)."""

from __future__ import annotations

import importlib.util

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
