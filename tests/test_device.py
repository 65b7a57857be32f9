"""``engine.device``: the sequential and parallel engines train where it says, and a device this machine lacks is
one line before anything is written. Everything here runs on the CPU (this machine has no GPU); what runs on
cuda is checked by benchmarks/gpu_check.sh on a machine that has one (docs/ray.md)."""

from __future__ import annotations

import pytest
import torch

from conftest import cli, tiny_args
from fedgap.config import load_config
from fedgap.errors import ConfigError
from fedgap.experiment.loop import Experiment
from fedgap.fl.device import check_device, to_cpu, to_device

NO_CUDA = not torch.cuda.is_available()


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedgap: error:") and "Traceback" not in err, err
    return lines[0].removeprefix("fedgap: error: ")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("engine", ["sequential", "parallel", "vectorized"])
def test_cuda_without_a_gpu_is_one_line_and_nothing_is_written(tiny_idx, tmp_path, capsys, engine):
    out = tmp_path / "run"
    code, _, err = cli("run", *tiny_args(tiny_idx), f"engine.name={engine}", "engine.device=cuda", "--out", str(out),
                       "--quiet", capsys=capsys)
    assert code == 2 and one_error_line(err).startswith("engine.device: 'cuda', but torch ")
    assert "sees no CUDA GPU on this machine" in err and not out.exists()


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
def test_the_doctor_refuses_cuda_without_a_gpu_before_anything_runs(tiny_idx, tmp_path, capsys):
    out = tmp_path / "d"
    code, _, err = cli("doctor", *tiny_args(tiny_idx), "engine.device=cuda", "--out", str(out), "--quiet",
                       capsys=capsys)
    assert code == 2 and "sees no CUDA GPU" in one_error_line(err) and not out.exists()


def test_device_names_are_checked():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"engine\.device: 'gpu0' is not a torch device \(cpu, cuda, cuda:N\)"):
        check_device("gpu0")
    with pytest.raises(ConfigError, match=r"engine\.device: 'meta': fedgap trains on cpu or cuda"):
        check_device("meta")


def test_moves_on_the_cpu_keep_the_tensors_and_results_are_copies():
    state = {"w": torch.arange(3.0)}
    assert to_device(state, torch.device("cpu"))["w"] is state["w"]  # no copy on the device it is already on
    out = to_cpu(state)
    state["w"].add_(1.0)  # the model keeps training after its result was taken
    assert torch.equal(out["w"], torch.arange(3.0))


@pytest.mark.parametrize("engine", ["sequential", "parallel"])
def test_an_explicit_cpu_device_trains_the_same_model_bit_for_bit(tiny_idx, engine):
    """The device moves are no-ops on the cpu: the model equals that of a run that never named a device, and the
    runner keeps the data set's own tensors (no copy)."""
    def run(*extra):
        exp = Experiment(load_config(overrides=[*tiny_args(tiny_idx), f"engine.name={engine}", "engine.workers=2",
                                                "engine.threads=1", *extra]), None, show_progress=False)
        exp.run()
        return exp

    a, b = run(), run("engine.device=cpu")
    assert a.server.model.keys() == b.server.model.keys()
    assert all(torch.equal(a.server.model[k], b.server.model[k]) for k in a.server.model)
    assert [r["test_accuracy"] for r in a.rows] == [r["test_accuracy"] for r in b.rows]
    runner = b.engine.local
    assert runner.device == torch.device("cpu") and runner.train_x is b.data.train_x
    assert all(v.device.type == "cpu" for v in b.server.model.values())


def test_parallel_workers_are_spawned_on_cuda_and_fork_is_refused(tiny_idx):
    from fedgap.engines.parallel import ParallelEngine, default_start_method

    assert default_start_method("cuda") == "spawn"
    cfg = load_config(overrides=[*tiny_args(tiny_idx), "engine.name=parallel", "engine.device=cuda",
                                 "engine.start_method=fork"])
    with pytest.raises(ConfigError, match=r"engine\.start_method=fork: a forked worker cannot use engine\.device=cuda"):
        ParallelEngine(cfg, None, None)
