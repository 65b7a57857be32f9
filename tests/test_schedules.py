"""Schedules: the client lr decay per round (client.lr_decay) and the server lr schedule (server.lr_schedule),
checked exactly. That every engine honours the client lr decay is in tests/test_engine_vectorized.py (end to
end, float64) and tests/test_export_flower.py (the Flower app)."""

from __future__ import annotations

import math

import torch

from conftest import tiny_args
from fedgap.config import load_config
from fedgap.experiment.loop import Experiment
from fedgap.fl.client import ClientHParams, ClientTask, RoundContext, local_update
from fedgap.fl.server import server_lr


def test_client_lr_decays_geometrically_per_round():
    hp = ClientHParams.from_config(load_config(overrides=["client.lr_decay=0.9"]))
    assert [hp.lr_scale(r) for r in (1, 2, 3)] == [1.0, 0.9, 0.9**2]
    assert ClientHParams.from_config(load_config()).lr_scale(50) == 1.0  # default: constant


def test_the_loop_sends_each_round_its_scale(tiny_idx):
    exp = Experiment(load_config(overrides=[*tiny_args(tiny_idx), "server.rounds=3", "client.lr_decay=0.5"]),
                     None, show_progress=False)
    seen = []
    train = exp.engine.train

    def spy(ctx, tasks):
        seen.append(ctx.lr_scale)
        return train(ctx, tasks)

    exp.engine.train = spy
    exp.run()
    assert seen == [1.0, 0.5, 0.25]


def test_a_scaled_round_is_the_step_at_the_scaled_lr(tiny_idx):
    """lr 0.1 at scale 0.5 trains exactly as lr 0.05 (0.1 * 0.5 == 0.05 in binary floating point)."""
    cfg = load_config(overrides=[*tiny_args(tiny_idx), "client.lr=0.1", "engine.threads=1"])
    exp = Experiment(cfg, None, show_progress=False)
    task = ClientTask(0, exp.parts[0])
    x, y = exp.data.train_x, exp.data.train_y
    scaled = local_update(exp.engine.model, x, y, RoundContext(2, exp.server.model, lr_scale=0.5), task, exp.hp)
    half = ClientHParams.from_config(load_config(overrides=[*tiny_args(tiny_idx), "client.lr=0.05"]),
                                     exp.hp.norm_keys, exp.hp.num_classes)
    plain = local_update(exp.engine.model, x, y, RoundContext(2, exp.server.model), task, half)
    full = local_update(exp.engine.model, x, y, RoundContext(2, exp.server.model), task, exp.hp)
    assert all(torch.equal(scaled.state[k], plain.state[k]) for k in plain.state)
    assert any(not torch.equal(scaled.state[k], full.state[k]) for k in full.state)


def test_cosine_server_lr_by_hand():
    server = load_config(overrides=["server.lr=0.2", "server.lr_schedule=cosine", "server.rounds=10"]).server
    assert server_lr(server, 1) == 0.2
    assert math.isclose(server_lr(server, 6), 0.1)  # half way: cos(pi / 2) = 0
    assert math.isclose(server_lr(server, 11), 0.0, abs_tol=1e-15)  # after the last round
    assert server_lr(load_config(overrides=["server.lr=0.2"]).server, 7) == 0.2  # constant
