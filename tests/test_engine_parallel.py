"""The parallel engine: same model as the sequential engine for every algorithm, resumable, fault tolerant,
and no worker outlives its run.

Tolerance: against the sequential engine with one intra-op thread (``engine.threads=1``) the results are
compared bit for bit: a worker runs the same kernels with the same thread count on the same batches, and the
server aggregates in client-id order whatever finished first. Against the sequential engine with two threads
they differ by float rounding only (intra-op threads split convolution and BatchNorm reductions differently);
measured after two rounds on the tiny set below: at most 7e-5 absolute in any weight, so that check uses 1e-3.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from fedgap.config import load_config
from fedgap.engines import engine_class
from fedgap.engines.parallel import MAX_RESTARTS, ParallelEngine
from fedgap.engines.schedule import balanced_groups, slice_bounds
from fedgap.errors import FedgapError
from fedgap.experiment.loop import Experiment
from fedgap.experiment.outputs import read_metrics
from fedgap.fl.client import ClientHParams, ClientTask, RoundContext
from fedgap.fl.objectives import OBJECTIVES
from fedgap.runtime import stop_signals_deferred

TIME_KEYS = {"seconds", "train_seconds"}
pytestmark = pytest.mark.timeout(180)  # a hang is a failure, not a 10-minute wait


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny(root, *extra):
    return ["data.name=idx", f"data.root={root}", "data.num_clients=6", "server.clients_per_round=4",
            "server.rounds=2", "eval.batch_size=50", *extra]


def run(args, out=None, **kwargs):
    exp = Experiment(load_config(overrides=args), out, show_progress=False, **kwargs)
    exp.run()
    return exp


def rows(exp):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in exp.rows]


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same_tensors(a[k], b[k])
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("extra", [
    ["server.algorithm=fedavg"],
    ["server.algorithm=fedprox", "server.mu=0.1"],
    ["server.algorithm=scaffold"],
    ["server.algorithm=fedbn"],
    ["server.algorithm=fednova", "model.name=simple-cnn"],
    ["server.algorithm=fedavg", "model.norm_policy=recalibrate"],
    *([f"client.objective={name}"] for name in OBJECTIVES if name not in ("local", "prox", "scaffold")),
    ["client.objective=logit_adjust+scaffold"],  # a joined objective (fedgap.fl.objectives.composite)
], ids=["fedavg", "fedprox", "scaffold", "fedbn", "fednova-simple-cnn", "recalibrate",
        *(name for name in OBJECTIVES if name not in ("local", "prox", "scaffold")), "logit_adjust+scaffold"])
def test_parallel_equals_sequential_bit_for_bit(tiny_idx, extra):
    seq = run(tiny(tiny_idx, *extra, "engine.threads=1"))
    par = run(tiny(tiny_idx, *extra, "engine.name=parallel", "engine.workers=2"))
    assert_same_tensors(seq.server.model, par.server.model)
    assert_same_tensors(seq.server.objective, par.server.objective)  # SCAFFOLD's c
    assert seq.server.clients.keys() == par.server.clients.keys()
    for cid in seq.server.clients:  # SCAFFOLD's c_i, FedBN's norm layers
        assert_same_tensors(seq.server.clients[cid], par.server.clients[cid])
    assert rows(seq) == rows(par)  # accuracy, loss (test set split over the workers), samples


def test_parallel_differs_from_two_thread_sequential_by_rounding_only(tiny_idx):
    seq = run(tiny(tiny_idx, "engine.threads=2", "server.rounds=1"))
    par = run(tiny(tiny_idx, "engine.name=parallel", "engine.workers=2", "server.rounds=1"))
    for k, v in seq.server.model.items():
        assert torch.allclose(v.double(), par.server.model[k].double(), rtol=0, atol=1e-3), k


def test_resume_with_parallel_equals_uninterrupted(tmp_path, tiny_idx):
    args = tiny(tiny_idx, "server.algorithm=scaffold", "engine.name=parallel", "server.rounds=3")
    full = run(args, tmp_path / "full")
    run([*args[:-1], "server.rounds=1"], tmp_path / "cut")
    resumed = run(args, tmp_path / "cut", resume=True)
    assert_same_tensors(full.server.model, resumed.server.model)
    assert rows(full) == rows(resumed)


def test_split_evaluation_equals_whole(tiny_idx):
    cfg = load_config(overrides=tiny(tiny_idx, "engine.name=parallel", "engine.workers=3", "eval.batch_size=30"))
    exp = Experiment(cfg, None, show_progress=False)
    with exp.engine as engine:
        assert len(engine.workers) == 3
        for train_mode in (False, True):  # batch statistics: the batches must be the sequential ones
            split = engine.evaluate_test(exp.server.model, train_mode=train_mode)
            whole = engine.local.evaluate(exp.server.model, exp.data.test_x, exp.data.test_y, train_mode=train_mode)
            assert split.count == whole.count == 200
            assert split.accuracy == whole.accuracy
            assert split.loss == pytest.approx(whole.loss, rel=1e-6)


def test_slices_and_groups():
    assert slice_bounds(10000, 2, 500) == [0, 5000, 10000]
    assert slice_bounds(10000, 3, 500) == [0, 3500, 6500, 10000]
    assert slice_bounds(200, 4, 500) == [0, 200]
    assert slice_bounds(0, 2, 500) == [0]
    groups = balanced_groups([5, 1, 9, 3, 7], 2)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    assert sorted(sum([5, 1, 9, 3, 7][i] for i in g) for g in groups) == [12, 13]


def test_failing_client_is_dropped_like_sequential(tiny_idx):
    extra = ["engine.fail_clients=[1,4]", "data.num_clients=6", "server.clients_per_round=6"]
    seq = run(tiny(tiny_idx, *extra, "engine.threads=1"))
    par = run(tiny(tiny_idx, *extra, "engine.name=parallel"))
    assert [r["clients_failed"] for r in par.rows] == [2, 2]
    assert_same_tensors(seq.server.model, par.server.model)


# ------------------------------------------------------------------------------------------------ faults

def engine_and_tasks(root, *extra, n=4):
    cfg = load_config(overrides=tiny(root, "engine.name=parallel", "engine.workers=2", *extra))
    exp = Experiment(cfg, None, show_progress=False)
    tasks = [ClientTask(c, exp.parts[c]) for c in range(n)]
    return exp.engine, RoundContext(1, exp.server.model), tasks


def exit_on_client(crash_ids):
    """A local_update that kills its worker process for the given clients (fork inherits the patch)."""
    from fedgap.fl.client import local_update

    def patched(model, x, y, ctx, task, hp):
        if task.client_id in crash_ids:
            os._exit(7)
        return local_update(model, x, y, ctx, task, hp)

    return patched


def test_dead_worker_fails_its_client_and_is_replaced(tiny_idx, monkeypatch):
    monkeypatch.setattr("fedgap.engines.worker.local_update", exit_on_client({2}))
    engine, ctx, tasks = engine_and_tasks(tiny_idx)
    with engine:
        before = {w.process.pid for w in engine.workers}
        out = engine.train(ctx, tasks)
        assert [r.client_id for r in out.results] == [0, 1, 3]
        assert [f.client_id for f in out.failures] == [2]
        assert "WorkerDied" in out.failures[0].reason and "exit code 7" in out.failures[0].reason
        assert len(engine.workers) == 2 and {w.process.pid for w in engine.workers} != before
        again = engine.train(ctx, [t for t in tasks if t.client_id != 2])
        assert [r.client_id for r in again.results] == [0, 1, 3]
    assert not psutil.Process().children(recursive=True)


def test_worker_killed_between_rounds_is_replaced_without_losing_clients(tiny_idx):
    engine, ctx, tasks = engine_and_tasks(tiny_idx)
    with engine:
        victim = engine.workers[0].process
        os.kill(victim.pid, signal.SIGKILL)
        victim.join()
        out = engine.train(ctx, tasks)
        assert [r.client_id for r in out.results] == [0, 1, 2, 3] and not out.failures
    assert not psutil.Process().children(recursive=True)


def test_workers_that_keep_dying_fail_clearly(tiny_idx, monkeypatch):
    monkeypatch.setattr("fedgap.engines.worker.local_update", exit_on_client(set(range(100))))
    engine, ctx, tasks = engine_and_tasks(tiny_idx, n=6)
    with pytest.raises(FedgapError) as info, engine:
        engine.train(ctx, tasks)
    message = str(info.value)
    assert "\n" not in message and "exit code 7" in message and f"{MAX_RESTARTS} workers were restarted" in message
    assert not psutil.Process().children(recursive=True)


def test_close_reaps_workers_after_an_exception(tiny_idx):
    engine, ctx, tasks = engine_and_tasks(tiny_idx)
    with pytest.raises(RuntimeError), engine:
        pids = [w.process.pid for w in engine.workers]
        assert all(psutil.pid_exists(p) for p in pids)
        raise RuntimeError("boom")
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert not psutil.Process().children(recursive=True)
    engine.close()  # twice is fine


def test_fork_after_parallel_work_in_the_parent_does_not_hang(tiny_idx):
    torch.set_num_threads(2)
    a = torch.randn(1500, 1500)
    for _ in range(3):  # OpenMP / MKL parallel regions in the parent right before the fork
        (a @ a).sum()
    engine, ctx, tasks = engine_and_tasks(tiny_idx)
    with engine:
        assert len(engine.train(ctx, tasks).results) == 4


@pytest.mark.parametrize("method", ["forkserver"])
def test_other_start_methods_give_the_same_model(tiny_idx, method):
    fork = run(tiny(tiny_idx, "engine.name=parallel"))
    other = run(tiny(tiny_idx, "engine.name=parallel", f"engine.start_method={method}"))
    assert_same_tensors(fork.server.model, other.server.model)


def test_engine_registered_with_defaults(tiny_idx):
    cfg = load_config(overrides=tiny(tiny_idx, "engine.name=parallel"))
    assert engine_class("parallel") is ParallelEngine
    exp = Experiment(cfg, None, show_progress=False)
    assert exp.engine.num_workers == len(os.sched_getaffinity(0))
    assert isinstance(exp.engine.hp, ClientHParams)


# ------------------------------------------------------------------------------------------------ no orphans

def wait_for_workers(proc, count=2, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        kids = [p for p in psutil.Process(proc.pid).children() if p.status() != psutil.STATUS_ZOMBIE]
        if len(kids) >= count:
            return [p.pid for p in kids]
        time.sleep(0.05)
    raise AssertionError("workers did not start")


def gone(pids, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.05)
    return False


def start_run(tmp_path, root, *extra):
    # 100000 rounds: the run cannot finish on its own before it is interrupted, even if this test process is
    # starved for seconds on a busy machine (200 tiny rounds once ended first and exited 0)
    args = [sys.executable, "-m", "fedgap", "run", *tiny(root, "engine.name=parallel", "server.rounds=100000",
                                                          "eval.every=100000", *extra),
            "--out", str(tmp_path / "run"), "--quiet"]
    # SIGINT back to its default in the run, as under a terminal: a test suite started in the background of a
    # non-interactive shell (nohup, `cmd &`) inherits it ignored, and the run would rightly ignore Ctrl-C too.
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "FEDGAP_NO_DOWNLOAD": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_no_orphan_workers_when_the_run_is_interrupted(tmp_path, tiny_idx, how):
    proc = start_run(tmp_path, tiny_idx)
    try:
        pids = wait_for_workers(proc)
        if how == "ctrl-c":  # what a terminal does: SIGINT to the whole foreground process group
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=25)
            except subprocess.TimeoutExpired:
                os.system(f"/work/main/.venv/bin/py-spy dump --pid {proc.pid} > /tmp/hang_dump.txt 2>&1")
                for k in psutil.Process(proc.pid).children():
                    os.system(f"/work/main/.venv/bin/py-spy dump --pid {k.pid} >> /tmp/hang_dump.txt 2>&1")
                raise
            assert proc.returncode != 0
        else:  # no cleanup can run in the parent: the workers must notice by themselves
            proc.kill()
            proc.wait(timeout=60)
        assert gone(pids), f"orphan workers after {how}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_killed_parallel_run_resumes_to_the_same_model(tmp_path, tiny_idx):
    # 30 tiny rounds take seconds: long enough that the kill after round 2 always lands mid-run
    args = tiny(tiny_idx, "engine.name=parallel", "server.rounds=30", "eval.every=1")
    full = run(args, tmp_path / "full")
    proc = subprocess.Popen([sys.executable, "-m", "fedgap", "run", *args, "--out", str(tmp_path / "cut"), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "FEDGAP_NO_DOWNLOAD": "1"})
    metrics = tmp_path / "cut" / "metrics.csv"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(read_metrics(metrics)) >= 2) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert 2 <= len(read_metrics(metrics)) < 30, "the kill did not land mid-run"
    resumed = run(args, tmp_path / "cut", resume=True)
    assert_same_tensors(full.server.model, resumed.server.model)
    assert rows(full) == rows(resumed)
    assert np.isfinite(resumed.rows[-1]["test_loss"])


def test_ten_thousand_clients_keep_state_only_for_those_sampled():
    """Scale: 10,000 clients of 6 samples, 100 per round; per-client state exists only for sampled clients."""
    exp = run(["data.partition=iid", "data.num_clients=10000", "server.clients_per_round=100", "server.rounds=1",
               "server.algorithm=scaffold", "engine.name=parallel"])
    assert exp.rows[0]["clients"] == 100 and exp.rows[0]["samples"] == 600
    assert len(exp.server.clients) == 100  # c_i of the clients sampled so far, nothing for the others
    assert sum(len(p) for p in exp.parts) == 60000


def test_a_ctrl_c_while_a_worker_is_forked_is_raised_after_the_fork():
    """A KeyboardInterrupt raised inside CPython's after-fork callbacks is dropped ("Exception ignored"): a Ctrl-C
    that landed in the fork of a worker was lost and the run went on. Forks happen with the stop signals held
    back (recorded, then raised again), so the interrupt arrives after the fork, in ordinary code."""
    ctx = multiprocessing.get_context("fork")
    with pytest.raises(KeyboardInterrupt):
        with stop_signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)  # pending, not raised here
            child = ctx.Process(target=os._exit, args=(0,))
            child.start()
            assert child.pid > 0
        pytest.fail("the interrupt must be raised when the signals are let through")
    child.join()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back
