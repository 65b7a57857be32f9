"""Diagnostics on constructed cases: identical clients give zero drift and zero BN divergence; clients with
disjoint label sets give large values."""

import math

import pytest
import torch

from fedgap.config import load_config
from fedgap.experiment.diagnostics import bn_divergence, client_drift, gaussian_distance
from fedgap.fl.batchnorm import batchnorm_layers
from fedgap.fl.evaluate import evaluate
from fedgap.fl.normpolicy import input_moments, layer_input_moments, recalibrate
from fedgap.models import build_model


def test_gaussian_distance_closed_form():
    # N(1, 4) against N(0, 1): sqrt((1-0)^2 + (2-1)^2) / 1 = sqrt(2) (EPS shifts it by ~1e-5)
    d = gaussian_distance(torch.tensor([1.0]), torch.tensor([4.0]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert d == pytest.approx(math.sqrt(2), rel=1e-4)
    assert gaussian_distance(torch.ones(3), torch.ones(3), torch.ones(3), torch.ones(3)) == 0.0


def test_identical_client_updates_have_zero_drift():
    start = {"w": torch.zeros(5), "b": torch.zeros(2)}
    final = {"w": torch.arange(5.0), "b": torch.tensor([1.0, -1.0])}
    drift = client_drift(start, [final, final, final], [10, 20, 30], ["w", "b"])
    assert drift.relative_spread == pytest.approx(0.0, abs=1e-12)
    assert drift.mean_cosine == pytest.approx(1.0)


def test_opposing_client_updates_have_large_drift():
    start = {"w": torch.zeros(4)}
    a, b = {"w": torch.tensor([1.0, 0, 0, 0])}, {"w": torch.tensor([-0.8, 0.1, 0, 0])}
    drift = client_drift(start, [a, b], [1, 1], ["w"])
    # mean = (0.1, 0.05): spread ~0.9 against a mean of norm ~0.11
    assert drift.relative_spread > 5
    assert drift.mean_cosine < 0.5


@pytest.fixture(scope="module")
def bn_model_and_clients(mnist):
    """A mobilenet-like with BatchNorm, and client data sets of 400 images: only 0s, only 1s, and two IID."""
    torch.manual_seed(0)
    model = build_model(load_config().model)
    layers = list(batchnorm_layers(model))
    y = mnist.train_y
    zeros = mnist.train_x[torch.nonzero(y == 0).flatten()[:400]]
    ones = mnist.train_x[torch.nonzero(y == 1).flatten()[:400]]
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    iid = (mnist.train_x[perm[:400]], mnist.train_x[perm[400:800]])
    return model, layers, zeros, ones, iid


def recalibrated(model, layers, clients):
    """Running statistics set to the exact population statistics of the clients' pooled data."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bns = batchnorm_layers(model)
    return recalibrate(state, [bns[name] for name in layers],
                       lambda st, layer: [layer_input_moments(model, st, x, layer) for x in clients])


def test_identical_clients_have_zero_bn_divergence(bn_model_and_clients):
    model, layers, zeros, _, _ = bn_model_and_clients
    state = recalibrated(model, layers, [zeros, zeros])
    moments = [input_moments(model, state, zeros, layers) for _ in range(2)]
    div = bn_divergence(moments, state, batchnorm_layers(model))
    for part in (div.divergence, div.running_error, div.client_spread):
        assert set(part) == set(layers)
        assert max(part.values()) < 1e-3
    # and the same pass with torch's BatchNorm in train mode sees exactly these batch statistics
    m = moments[0][layers[0]]
    assert torch.allclose(m.mean.float(), state[f"{layers[0]}.running_mean"], atol=1e-5)


def test_disjoint_label_sets_have_large_bn_divergence(bn_model_and_clients):
    model, layers, zeros, ones, iid = bn_model_and_clients

    def spread(clients):
        state = recalibrated(model, layers, clients)
        div = bn_divergence([input_moments(model, state, x, layers) for x in clients], state, batchnorm_layers(model))
        return div, state

    disjoint, state = spread([zeros, ones])
    means = disjoint.means()
    # the running statistics fit the pooled data exactly, so all the divergence is client spread
    assert means["bn_running_error"] < 1e-3
    assert means["bn_divergence"] == pytest.approx(means["bn_client_spread"], rel=0.05)
    # measured: ~0.19 per layer for 0s vs 1s, ~0.005 for two IID halves (sampling noise only)
    baseline = spread(list(iid))[0]
    for layer in layers:
        assert disjoint.client_spread[layer] > 10 * baseline.client_spread[layer], layer
    # running statistics of one client's data only: the pooled data are far from them
    only_zeros = recalibrated(model, layers, [zeros])
    moments = [input_moments(model, only_zeros, x, layers) for x in (zeros, ones)]
    assert bn_divergence(moments, only_zeros, batchnorm_layers(model)).means()["bn_running_error"] > 0.05


def test_train_mode_evaluation_touches_only_batchnorm(mnist):
    cfg = load_config(overrides=["model.norm=group", "model.dropout=0.5"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    x, y = mnist.test_x[:300], mnist.test_y[:300]
    a = evaluate(model, None, x, y, train_mode=False)
    b = evaluate(model, None, x, y, train_mode=True)
    assert (a.accuracy, a.loss) == (b.accuracy, b.loss)  # no BN: identical, dropout stayed off


def test_diagnostics_columns_in_a_real_run(tmp_path, capsys):
    from conftest import FAST, cli
    from fedgap.experiment.outputs import read_metrics

    out = tmp_path / "run"
    code, _, err = cli("run", *FAST, "server.rounds=1", "eval.diagnostics=true", "--out", str(out), "--quiet",
                       capsys=capsys)
    assert code == 0, err
    row = read_metrics(out / "metrics.csv")[0]
    for key in ("client_drift", "update_cosine", "train_mode_accuracy", "bn_divergence", "bn_running_error",
                "bn_client_spread", "client_acc_mean", "client_acc_std", "bn_divergence[features.0.1]"):
        assert row[key] != "", key
    assert float(row["client_drift"]) > 0 and -1 <= float(row["update_cosine"]) <= 1
