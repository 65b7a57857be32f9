"""Exact checks of the algorithms as the round loop runs them: FedAvg with one client is centralized SGD,
sample-weighted averaging, FedBN's per-client norm state, exact BatchNorm recalibration, SCAFFOLD's option II
identity, and every preset running, resuming exactly and deterministically."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedgap.config import load_config
from fedgap.experiment.loop import Experiment, initial_model
from fedgap.fl.batchnorm import batchnorm_layers
from fedgap.fl.client import ClientHParams, ClientResult, ClientTask, RoundContext, epoch_orders, local_update
from fedgap.fl.normpolicy import layer_input_moments, recalibrate
from fedgap.models import build_model


def float_state(model):
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def test_fedavg_with_one_client_is_centralized_sgd_step_for_step(tiny_idx):
    cfg = load_config(overrides=["data.name=idx", f"data.root={tiny_idx}", "data.partition=central",
                                 "server.rounds=1", "client.epochs=3", "client.batch_size=32",
                                 "client.weight_decay=0.001", "engine.channels_last=false"])
    exp = Experiment(cfg, None, show_progress=False)
    exp.run()

    # The plain centralized loop: same init, same batch order, one SGD optimizer for all epochs.
    model = initial_model(cfg, exp.data)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.client.lr, momentum=cfg.client.momentum,
                          weight_decay=cfg.client.weight_decay)
    x, y = exp.data.train_x, exp.data.train_y
    model.train()
    steps = 0
    for order in epoch_orders(exp.hp, 1, 0, len(x)):
        for start in range(0, len(x), 32):
            batch = torch.from_numpy(order[start : start + 32])
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    assert steps == 3 * 10  # 300 samples: 9 full batches and one of 12, three epochs
    reference = float_state(model)
    for k, v in reference.items():
        assert torch.equal(exp.server.model[k], v), k  # bit for bit


def fake_result(cid, n, value, keys_like):
    return ClientResult(cid, n, {k: torch.full_like(v, value) for k, v in keys_like.items()}, 0.0, n, 1)


def test_aggregation_is_weighted_by_client_samples():
    cfg = load_config(overrides=["data.num_clients=4", "server.clients_per_round=2"])
    exp = Experiment(cfg, None, show_progress=False)
    floats = {k: v for k, v in exp.server.model.items() if v.is_floating_point()}
    counter_before = exp.server.model["features.0.1.num_batches_tracked"].clone()
    new = exp.aggregate([fake_result(0, 100, 1.0, floats), fake_result(3, 300, 5.0, floats)], 1).model
    for k in floats:
        assert torch.allclose(new[k], torch.full_like(new[k], (100 * 1.0 + 300 * 5.0) / 400), atol=1e-6), k
    assert torch.equal(new["features.0.1.num_batches_tracked"], counter_before)  # integer buffers not averaged


def test_fedbn_global_norm_layers_are_the_plain_average_whatever_the_server_optimizer():
    """Under the local norm policy the global model's norm layers are only for its evaluation: their weighted
    mean, never a server-optimizer step (a FedYogi step on norm weights no client uses is not their average)."""
    cfg = load_config(overrides=["data.num_clients=4", "server.clients_per_round=2", "model.norm_policy=local",
                                 "server.optimizer=yogi", "server.lr=0.01"])
    exp = Experiment(cfg, None, show_progress=False)
    floats = {k: v for k, v in exp.server.model.items() if v.is_floating_point()}
    old = {k: v.clone() for k, v in exp.server.model.items()}
    new = exp.aggregate([fake_result(0, 100, 1.0, floats), fake_result(3, 300, 5.0, floats)], 1).model
    norm_params = [k for k in exp.param_keys if k in exp.norm_keys]
    assert norm_params
    for k in norm_params:
        assert torch.allclose(new[k], torch.full_like(new[k], 4.0)), k  # (100 * 1 + 300 * 5) / 400
    conv = "features.0.0.weight"
    step = new[conv] - old[conv]  # Yogi's first step: lr * sign(delta) (up to tau), not the mean
    assert torch.allclose(step.abs(), torch.full_like(step, 0.01), rtol=0.01)


def test_scaffold_control_variate_matches_option_ii_for_plain_sgd(mnist):
    cfg = load_config(overrides=["server.algorithm=scaffold", "client.momentum=0"])
    model = build_model(cfg.model)
    hp = ClientHParams.from_config(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    c = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in params.items()}
    c_i = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in params.items()}
    task = ClientTask(7, np.arange(200), {"objective": c_i})
    res = local_update(model, mnist.train_x, mnist.train_y, RoundContext(1, state, c), task, hp)
    k_steps = res.steps
    assert k_steps == 7
    for k in params:
        option_ii = c_i[k] - c[k] + (state[k] - res.state[k]) / (k_steps * hp.lr)
        assert torch.allclose(res.own["objective"][k], option_ii, atol=2e-4, rtol=1e-3), k


def test_fedbn_keeps_each_clients_norm_layers(tmp_path, tiny_idx):
    cfg = load_config(overrides=["server.algorithm=fedbn", "data.num_clients=4", "server.clients_per_round=2",
                                 "server.rounds=3", "eval.every=100", "data.name=idx", f"data.root={tiny_idx}"])
    exp = Experiment(cfg, tmp_path / "run", show_progress=False)
    exp.run()
    norm_keys = exp.norm_keys
    assert norm_keys and all("running" in k or k.endswith(("weight", "bias")) for k in norm_keys)
    seen = sorted(exp.server.clients)
    assert seen and all(set(exp.server.clients[c]["norm"]) == norm_keys for c in seen)
    # Two clients' own norm layers differ from each other and from the global average.
    a, b = (exp.server.clients[c]["norm"] for c in seen[:2])
    key = "features.0.1.running_mean"
    assert not torch.equal(a[key], b[key]) and not torch.equal(a[key], exp.server.model[key])
    # A client starts from the global weights with its own norm layers swapped in.
    from fedgap.fl.client import start_state

    own = exp.server.clients[seen[0]]
    start = start_state(RoundContext(4, exp.server.model), ClientTask(seen[0], np.arange(3), own),
                        exp.hp)
    assert torch.equal(start[key], exp.server.clients[seen[0]]["norm"][key])
    conv = "features.0.0.weight"
    assert torch.equal(start[conv], exp.server.model[conv])
    # Through a resume, the per-client norm state survives unchanged.
    again = Experiment(cfg, tmp_path / "run", resume=True, show_progress=False)
    assert sorted(again.server.clients) == seen
    assert all(torch.equal(again.server.clients[c]["norm"][k], exp.server.clients[c]["norm"][k])
               for c in seen for k in norm_keys)


def test_recalibration_equals_central_statistics_over_the_union(mnist):
    cfg = load_config()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # make the running statistics deliberately wrong
        for bn in batchnorm_layers(model).values():
            bn.module.running_mean.uniform_(-1, 1)
            bn.module.running_var.uniform_(0.5, 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    clients = [mnist.train_x[:300], mnist.train_x[5000:5123], mnist.train_x[40000:40777]]
    layers = list(batchnorm_layers(model).values())
    fed = recalibrate(state, layers, lambda st, layer: [layer_input_moments(model, st, x, layer, batch_size=128)
                                                       for x in clients])
    # Central reference: the union as one batch, layer by layer, in torch's own convention for running_var: the
    # unbiased variance (n / (n - 1) times the biased one; here n >= 1200 x 7 x 7, so it differs by <= 1.7e-5).
    union = torch.cat(clients)
    central = dict(state)
    captured = {}
    for bn in layers:
        handle = bn.module.register_forward_pre_hook(lambda m, inp: captured.update(x=inp[0].double()))
        model.load_state_dict(central)
        model.eval()
        with torch.no_grad():
            model(union)
        handle.remove()
        z = captured["x"]
        central[bn.mean_key] = z.mean(dim=(0, 2, 3)).float()
        central[bn.var_key] = z.var(dim=(0, 2, 3), unbiased=True).float()
    for bn in layers:
        for key in (bn.mean_key, bn.var_key):
            # float32 activations of one union batch against per-client batches: oneDNN may pick other kernels
            # for the two batch shapes, a few ulps per layer that the next layer's input carries on: 1e-5 relative
            assert torch.allclose(fed[key], central[key], rtol=1e-5, atol=1e-6), key
            assert not torch.allclose(fed[key], state[key])


PRESETS = ["fedavg", "fedprox", "scaffold", "fedbn", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fednova"]
CASES = [[f"server.algorithm={p}"] for p in PRESETS] + [["model.norm_policy=recalibrate"]]
IDS = [*PRESETS, "recalibrate"]


def numbers(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in rows]


@pytest.mark.parametrize("overrides", CASES, ids=IDS)
def test_every_preset_resumes_exactly_and_is_deterministic(tmp_path, tiny_idx, overrides):
    small = ["data.name=idx", f"data.root={tiny_idx}", "data.num_clients=10", "server.clients_per_round=3",
             "eval.every=1", *overrides]
    cfg = load_config(overrides=[*small, "server.rounds=3"])
    straight = Experiment(cfg, tmp_path / "straight", show_progress=False)
    straight.run()
    Experiment(load_config(overrides=[*small, "server.rounds=1"]), tmp_path / "cut", show_progress=False).run()
    resumed = Experiment(cfg, tmp_path / "cut", resume=True, show_progress=False)
    resumed.run()
    assert numbers(resumed.rows) == numbers(straight.rows)
    for name in ("model", "optimizer", "objective"):
        a, b = getattr(resumed.server, name), getattr(straight.server, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed.server.clients.keys() == straight.server.clients.keys()
    # and the run actually moved: the server state differs from the initial model
    init = initial_model(cfg, straight.data).state_dict()
    assert any(not torch.equal(init[k], straight.server.model[k]) for k in straight.param_keys)


@pytest.mark.parametrize("overrides", CASES, ids=IDS)
def test_every_preset_runs_from_the_cli_on_mnist(tmp_path, capsys, overrides):
    from conftest import FAST, cli

    code, out, err = cli("run", *FAST, "server.rounds=1", *overrides, "--out", str(tmp_path / "r"), "--quiet",
                         capsys=capsys)
    assert code == 0, err
    assert "final test accuracy" in out
