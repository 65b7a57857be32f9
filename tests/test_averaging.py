"""server.average: the polynomial-decay average of the round models (fedgap.fl.averaging) and how the loop uses
it: evaluated and checkpointed, never trained from; resumable; off by default without changing any hash."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import tiny_args
from fedgap.callbacks import RoundCallback
from fedgap.config import config_to_dict, load_config, results_hash
from fedgap.experiment.loop import Experiment
from fedgap.experiment.outputs import load_checkpoint
from fedgap.fl.averaging import as_model, average_update, new_model_weight


def model(w: float, count: int) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([w]), "bn.num_batches_tracked": torch.tensor(count)}


def test_uniform_average_at_eta_zero():
    avg = None
    for t, w in enumerate([1.0, 3.0, 8.0], start=1):
        avg = average_update(avg, model(w, t), 0.0, t)
    assert avg["w"].item() == 4.0  # (1 + 3 + 8) / 3
    assert avg["w"].dtype == torch.float64
    assert avg["bn.num_batches_tracked"].item() == 3  # integer buffers: the latest model's


def test_polynomial_decay_weights_by_hand():
    # eta = 1: w_t = 2 / (t + 1): 1, 2/3, 1/2
    assert [new_model_weight(1.0, t) for t in (1, 2, 3)] == [1.0, 2 / 3, 0.5]
    first = model(1.0, 1)
    avg = average_update(None, first, 1.0, 1)
    assert avg["w"].item() == 1.0
    avg = average_update(avg, model(3.0, 2), 1.0, 2)
    assert avg["w"].item() == pytest.approx(1 / 3 + 2)  # 1/3 * 1 + 2/3 * 3
    before = avg["w"].clone()
    avg2 = average_update(avg, model(8.0, 3), 1.0, 3)
    assert avg2["w"].item() == pytest.approx(0.5 * 7 / 3 + 4)
    assert torch.equal(avg["w"], before) and first["w"].item() == 1.0  # pure: inputs untouched
    assert as_model(avg2, first)["w"].dtype == torch.float32


def test_a_later_first_round_starts_the_average_fresh():
    # the weight is (eta + 1) / (t + eta) >= 1 only at t = 1; an average that has none yet starts from the model
    avg = average_update(None, model(5.0, 9), 3.0, 10)
    assert avg["w"].item() == 5.0


def capture_states():
    states = []

    class Capture(RoundCallback):
        def on_round_end(self, info):
            states.append({k: v.clone() for k, v in info.state.items()})
            return {}

    return states, Capture()


def test_the_loop_evaluates_the_average_and_trains_from_the_round_model(tiny_idx, tmp_path):
    args = [*tiny_args(tiny_idx), "server.rounds=3", "engine.threads=1", "data.validation=0.2"]
    states, capture = capture_states()
    exp = Experiment(load_config(overrides=[*args, "server.average=1"]), tmp_path / "avg", callbacks=[capture],
                     show_progress=False)
    exp.run()
    plain_states, plain_capture = capture_states()
    Experiment(load_config(overrides=args), tmp_path / "plain", callbacks=[plain_capture], show_progress=False).run()
    for a, b in zip(states, plain_states, strict=True):  # training never sees the average
        assert all(torch.equal(a[k], b[k]) for k in a)
    avg = None
    for t, st in enumerate(states, start=1):
        avg = average_update(avg, st, 1.0, t)
        expected = as_model(avg, st)
        row = exp.rows[t - 1]
        test, val = exp.engine.evaluate_test(expected), exp.engine.evaluate(expected, exp.val_x, exp.val_y)
        assert (row["test_accuracy"], row["test_loss"]) == (test.accuracy, test.loss)
        assert (row["val_accuracy"], row["val_loss"]) == (val.accuracy, val.loss)
        if t > 1:  # the round's own model scores otherwise: the rows really are the average's
            assert row["test_loss"] != exp.engine.evaluate_test(st).loss
    saved = load_checkpoint(tmp_path / "avg" / "checkpoint.pt")
    assert all(torch.equal(saved["server"]["average"][k], avg[k]) for k in avg)
    assert all(torch.equal(saved["server"]["model"][k], states[-1][k]) for k in states[-1])


def test_extending_an_averaged_run_equals_running_it_through(tiny_idx, tmp_path):
    args = [*tiny_args(tiny_idx), "engine.threads=1", "server.average=0.5"]
    Experiment(load_config(overrides=[*args, "server.rounds=4"]), tmp_path / "full", show_progress=False).run()
    Experiment(load_config(overrides=[*args, "server.rounds=2"]), tmp_path / "cut", show_progress=False).run()
    Experiment(load_config(overrides=[*args, "server.rounds=4"]), tmp_path / "cut", resume=True,
               show_progress=False).run()
    full, cut = (load_checkpoint(tmp_path / n / "checkpoint.pt") for n in ("full", "cut"))
    assert [r["test_accuracy"] for r in full["rows"]] == [r["test_accuracy"] for r in cut["rows"]]
    assert all(torch.equal(full["server"]["average"][k], cut["server"]["average"][k])
               for k in full["server"]["average"])


def test_off_by_default_and_absent_from_the_hash_while_off():
    cfg = load_config()
    assert cfg.server.average is None
    tree = config_to_dict(cfg)
    for section in ("engine", "checkpoint", "track"):
        tree.pop(section)
    tree["eval"].pop("diagnostics")
    tree["server"].pop("average")  # the hash of a config from before the key existed
    for later in ("bn_momentum", "bn_eps"):  # (and before these, added later, off by default too)
        tree["model"].pop(later)
    tree["data"].pop("labels_per_client")  # a later key too (the labels partition), absent at its default
    assert results_hash(cfg) == hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]
    assert results_hash(load_config(overrides=["server.average=3"])) != results_hash(cfg)
    assert results_hash(load_config(overrides=["server.average=0"])) != results_hash(cfg)  # 0 is uniform, not off
