"""FedNova (fedgap.fl.fednova): the step weight a_i against torch's momentum SGD, the server update on
hand-computed numbers in float64, FedAvg when the step counts are equal, and its composition with a server
optimizer and with client objectives. The engines' agreement is in tests/test_engine_*.py and test_ray_engine.py."""

import pytest
import torch

from conftest import tiny_args
from fedgap.config import load_config
from fedgap.errors import ConfigError
from fedgap.experiment.loop import Experiment
from fedgap.fl import fednova
from fedgap.fl.aggregate import ServerComponents, ServerState, server_update
from fedgap.fl.client import ClientResult
from fedgap.fl.objectives import make_objective
from fedgap.fl.server import AdamServer, ServerOptimizer


@pytest.mark.parametrize(("steps", "rho", "expected"), [(3, 0.0, 3.0), (3, 0.5, 4.25), (2, 0.5, 2.5),
                                                         (4, 0.5, 6.125), (1, 0.9, 1.0)])
def test_step_weight_by_hand(steps, rho, expected):
    # rho 0.5, 3 steps: the gradients' weights are (1 - rho^(3-k+1)) / (1 - rho) = 1.75, 1.5, 1 -> 4.25
    assert fednova.step_weight(steps, rho) == expected


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_step_weight_is_what_torch_sgd_with_momentum_moves_under_a_constant_gradient(rho):
    # loss <c, w>: every gradient is c, so after tau steps w - w0 = -lr * a * c exactly (up to float64 rounding)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    opt = torch.optim.SGD([w], lr=0.1, momentum=rho)
    for _ in range(7):
        opt.zero_grad()
        (c * w).sum().backward()
        opt.step()
    torch.testing.assert_close(w.detach(), -0.1 * fednova.step_weight(7, rho) * c, rtol=1e-13, atol=1e-15)


def results(*clients):
    """ClientResults from (id, samples, steps, w) with a float64 parameter w and a running mean equal to w."""
    return [ClientResult(cid, n, {"w": torch.tensor(w, dtype=torch.float64),
                                  "bn.running_mean": torch.tensor(w, dtype=torch.float64)}, 0.0, n, steps)
            for cid, n, steps, w in clients]


X = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64), "bn.running_mean": torch.zeros(2, dtype=torch.float64)}
# client 1: 1 sample, 2 steps, moved by (-1, 0); client 2: 3 samples, 4 steps, moved by (0, 3)
TWO = results((1, 1, 2, [0.0, 2.0]), (2, 3, 4, [1.0, 5.0]))


def update(res, rho=None, opt=None, objective="local", **params):
    norm = None if rho is None else (lambda m, r, k: fednova.normalized(m, r, k, rho))
    comps = ServerComponents(opt or ServerOptimizer(lr=1.0), make_objective(objective, **params), ("w",), 10, norm)
    optimizer = opt.init({"w": X["w"]}) if opt else {}
    return server_update(ServerState(dict(X), optimizer, {}, {}), res, comps)


def test_fednova_update_by_hand_plain_sgd():
    # p = 1/4, 3/4; a = 2, 4; tau_eff = 1/4*2 + 3/4*4 = 3.5
    # Delta = 3.5 * (1/4 * (-1, 0) / 2 + 3/4 * (0, 3) / 4) = (-0.4375, 1.96875): exact in binary
    after = update(TWO, rho=0.0)
    assert after.model["w"].tolist() == [1.0 - 0.4375, 2.0 + 1.96875]
    assert update(TWO).model["w"].tolist() == [0.75, 4.25]  # FedAvg: x + 1/4 (-1, 0) + 3/4 (0, 3)
    # running statistics are estimates, not updates: the plain sample-weighted mean either way
    assert after.model["bn.running_mean"].tolist() == [0.75, 4.25]


def test_fednova_update_by_hand_with_momentum():
    # rho 1/2: a = 2.5 (2 steps) and 6.125 (4 steps); tau_eff = 1/4*2.5 + 3/4*6.125 = 167/32
    # Delta = 167/32 * (1/4 * (-1, 0) / (5/2), 3/4 * (0, 3) / (49/8)) = (-167/320, 167*9*8 / (32*4*49))
    after = update(TWO, rho=0.5)
    expected = torch.tensor([1.0 - 167 / 320, 2.0 + 167 * 9 * 8 / (32 * 4 * 49)], dtype=torch.float64)
    torch.testing.assert_close(after.model["w"], expected, rtol=1e-15, atol=0)


def test_equal_steps_without_momentum_is_fedavg_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    same = results(*((cid, n, 5, torch.randn(2, generator=gen, dtype=torch.float64).tolist())
                     for cid, n in ((1, 7), (2, 30), (3, 11))))
    assert torch.equal(update(same, rho=0.0).model["w"], update(same).model["w"])
    # with momentum every a_i is equal too: FedAvg up to the rounding of tau_eff / a_i
    torch.testing.assert_close(update(same, rho=0.9).model["w"], update(same).model["w"], rtol=1e-15, atol=1e-15)


def test_a_server_optimizer_steps_on_the_normalized_update():
    opt = AdamServer(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    delta = {"w": torch.tensor([-0.4375, 1.96875], dtype=torch.float64)}  # the plain-SGD Delta above
    expected, _ = opt.step({"w": X["w"]}, delta, opt.init({"w": X["w"]}))
    assert torch.equal(update(TWO, rho=0.0, opt=opt).model["w"], expected["w"])


def test_an_objectives_server_state_sees_the_uploads_not_the_rescaled_states():
    # FedDyn's h moves with the uploads; its last word (mean - h / alpha) then applies to FedNova's model
    res = results((1, 1, 2, [0.0, 2.0]), (2, 3, 4, [1.0, 5.0]))
    for r, up in zip(res, ([1.0, 0.0], [0.0, 2.0]), strict=True):
        r.upload = {"w": torch.tensor(up, dtype=torch.float64)}
    comps = ServerComponents(ServerOptimizer(lr=1.0), make_objective("feddyn", alpha=0.5), ("w",), 10,
                             lambda m, r, k: fednova.normalized(m, r, k, 0.0))
    obj = comps.objective.server_init({"w": X["w"]})
    after = server_update(ServerState(dict(X), {}, obj, {}), res, comps)
    h = torch.tensor([-0.05, -0.1], dtype=torch.float64)  # -alpha / N * sum of uploads
    torch.testing.assert_close(after.objective["w"], h, rtol=1e-15, atol=0)
    torch.testing.assert_close(after.model["w"], torch.tensor([0.5625, 3.96875], dtype=torch.float64) - h / 0.5,
                               rtol=1e-15, atol=0)


def run(root, *extra):
    exp = Experiment(load_config(overrides=[*tiny_args(root), "engine.threads=1", *extra]), show_progress=False)
    exp.run()
    return exp


def test_fednova_run_equals_fedavg_when_clients_take_equal_steps(tiny_idx):
    # IID over 10 clients of the 300 tiny images: 30 rows each, the same number of steps
    equal = ["data.partition=iid", "client.momentum=0"]
    nova, avg = run(tiny_idx, *equal, "server.algorithm=fednova"), run(tiny_idx, *equal)
    assert all(torch.equal(nova.server.model[k], avg.server.model[k]) for k in avg.server.model)


def test_fednova_run_differs_from_fedavg_with_unequal_clients_and_composes(tiny_idx):
    nova = run(tiny_idx, "server.algorithm=fednova")
    avg = run(tiny_idx)
    assert any(not torch.equal(nova.server.model[k], avg.server.model[k]) for k in nova.param_keys)
    # FedNova under a FedAdam server with logit-adjusted FedProx clients: one preset, the other pieces chosen
    mixed = run(tiny_idx, "server.algorithm=fednova", "server.optimizer=adam", "client.objective=logit_adjust+prox")
    assert mixed.components.normalize is not None and all(torch.isfinite(v).all() for v in mixed.server.model.values()
                                                          if v.is_floating_point())


def test_fednova_needs_sgd_clients():
    with pytest.raises(ConfigError, match="client.optimizer: server.algorithm=fednova .* needs sgd, got adamw"):
        load_config(overrides=["server.algorithm=fednova", "client.optimizer=adamw"])
