"""The round as a public API (``Experiment.plan_round`` / ``finish_round``) on one server state: what the loop, the
Flower strategy and these tests all call; and the checkpoint that saves exactly that state."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_args
from fedgap.config import load_config
from fedgap.engines import RoundOutput
from fedgap.experiment import checkpoint
from fedgap.experiment.loop import Experiment
from fedgap.experiment.outputs import load_checkpoint, save_checkpoint
from fedgap.fl.client import ClientResult


def experiment(tiny_idx, *extra, out=None, **kwargs):
    cfg = load_config(overrides=[*tiny_args(tiny_idx), "engine.threads=1", *extra])
    return Experiment(cfg, out, show_progress=False, **kwargs)


def constant_result(task, value, floats):
    """A client result whose every floating entry is ``value`` (weight: the client's sample count)."""
    n = len(task.indices)
    return ClientResult(task.client_id, n, {k: torch.full_like(v, value) for k, v in floats.items()}, 1.0, n, 1)


def test_finish_round_with_constructed_results_aggregates_them_and_writes_the_row(tiny_idx):
    exp = experiment(tiny_idx)
    plan = exp.plan_round()
    assert plan.round == 1 and [t.client_id for t in plan.tasks] == sorted(t.client_id for t in plan.tasks)
    assert plan.context.global_state is exp.server.model and len(plan.tasks) == 3
    floats = {k: v for k, v in exp.server.model.items() if v.is_floating_point()}
    results = [constant_result(t, float(i + 1), floats) for i, t in enumerate(plan.tasks)]
    before = exp.server
    row = exp.finish_round(plan, RoundOutput(results))
    sizes = [len(t.indices) for t in plan.tasks]
    mean = sum((i + 1) * n for i, n in enumerate(sizes)) / sum(sizes)  # FedAvg, server lr 1: the weighted mean
    for k in floats:
        assert torch.allclose(exp.server.model[k], torch.full_like(floats[k], mean), atol=1e-6), k
    assert before.model is not exp.server.model and torch.equal(before.model[k], floats[k])  # nothing in place
    assert exp.round == 1 and exp.rows == [row] and row["clients"] == 3 and row["samples"] == sum(sizes)
    assert row["test_accuracy"] is not None and row["seconds"] > 0  # eval.every=1: evaluated
    with pytest.raises(ValueError, match="round 1 given, round 2 expected"):
        exp.finish_round(plan, RoundOutput(results))


def test_a_round_through_the_api_equals_a_step(tiny_idx):
    stepped, by_hand = experiment(tiny_idx), experiment(tiny_idx)
    stepped.engine.start(), by_hand.engine.start()  # engine.threads=1 for both
    for _ in range(2):
        stepped.step()
        plan = by_hand.plan_round()
        by_hand.finish_round(plan, by_hand.engine.train(plan.context, plan.tasks))
    drop = {"seconds", "train_seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in stepped.rows] == \
        [{k: v for k, v in r.items() if k not in drop} for r in by_hand.rows]
    assert all(torch.equal(stepped.server.model[k], v) for k, v in by_hand.server.model.items())


def test_the_checkpoint_holds_the_one_server_state_and_an_older_format_still_resumes(tiny_idx, tmp_path):
    extra = ["server.algorithm=scaffold", "server.average=1"]  # objective state, client state and an average
    straight = experiment(tiny_idx, *extra, "server.rounds=3", out=tmp_path / "straight")
    straight.run()
    experiment(tiny_idx, *extra, "server.rounds=2", out=tmp_path / "cut").run()
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert saved["format"] == checkpoint.FORMAT and set(saved["server"]) == \
        {"model", "optimizer", "objective", "clients", "average"}
    # the same checkpoint as format 1 wrote it (the server state as separate entries)
    server = saved.pop("server")
    saved.update(format=1, state=server["model"], server_state=server["optimizer"],
                 objective_state=server["objective"], client_store=server["clients"], average=server["average"])
    save_checkpoint(tmp_path / "cut" / "checkpoint.pt", saved)
    resumed = experiment(tiny_idx, *extra, "server.rounds=3", out=tmp_path / "cut", resume=True)
    resumed.run()
    for part in ("model", "optimizer", "objective", "average"):
        a, b = getattr(resumed.server, part), getattr(straight.server, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert resumed.server.clients.keys() == straight.server.clients.keys()
