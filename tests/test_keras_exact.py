"""Exactness, not resemblance (issue 23, item 6): a Keras network and its torch twin with identical weights and the
same BatchNorm momentum, eps and padding end one client round of ``local_update`` with the same model (float64);
FedBN on a Keras model keeps each client's BatchNorm layers and averages the rest (exact); recalibration writes the
exact population statistics of a Keras BatchNorm layer's input, in Keras' (biased) convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedgap.models.keras_backend import use_torch_backend

use_torch_backend()
keras = pytest.importorskip("keras")

from conftest import tiny_args  # noqa: E402
from fedgap.callbacks import RoundCallback  # noqa: E402
from fedgap.config import load_config  # noqa: E402
from fedgap.experiment.loop import Experiment  # noqa: E402
from fedgap.fl.batchnorm import batchnorm_layers  # noqa: E402
from fedgap.fl.client import ClientHParams, ClientTask, RoundContext, local_update  # noqa: E402
from fedgap.fl.normpolicy import layer_input_moments, norm_policy, recalibrate  # noqa: E402
from fedgap.fl.state import weighted_mean  # noqa: E402
from fedgap.models.keras_adapter import adapt  # noqa: E402
from fedgap.models.keras_backend import keras_build_scope  # noqa: E402
from keras_models import factories  # noqa: E402

SIZE, CLASSES, MOMENTUM, EPS = 6, 4, 0.1, 1e-3  # torch's momentum convention; Keras gets 1 - MOMENTUM


def keras_net():
    layers = keras.layers
    inputs = keras.Input(shape=(SIZE, SIZE, 1))
    x = layers.Conv2D(3, 3, padding="same")(inputs)  # stride 1: 'same' pads 1 on every side, as torch's padding=1
    x = layers.BatchNormalization(momentum=1 - MOMENTUM, epsilon=EPS)(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(CLASSES)(x))


def torch_twin(k) -> nn.Module:
    """The same network in torch, with the Keras model ``k``'s weights (kernels HWIO -> OIHW, dense (in, out) ->
    (out, in))."""
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, momentum=MOMENTUM, eps=EPS), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, CLASSES)).double()
    w = {key: torch.as_tensor(np.asarray(v), dtype=torch.float64) for key, v in keras_weights(k).items()}
    with torch.no_grad():
        net[0].weight.copy_(w["conv2d.kernel"].permute(3, 2, 0, 1))
        net[0].bias.copy_(w["conv2d.bias"])
        net[1].weight.copy_(w["batch_normalization.gamma"])
        net[1].bias.copy_(w["batch_normalization.beta"])
        net[5].weight.copy_(w["dense.kernel"].T)
        net[5].bias.copy_(w["dense.bias"])
    return net


def keras_weights(k) -> dict[str, np.ndarray]:
    return {v.path.replace("/", "."): keras.ops.convert_to_numpy(v) for v in k.variables}


def test_one_round_of_local_update_is_the_same_model_in_keras_and_torch():
    """Tolerance, derived: both models are float64 (keras.config.set_floatx), but Keras' BatchNormalization computes
    in float32 whatever the model's dtype (it casts its input to backend.result_type(dtype, "float32"), which is
    float32 for float64 in Keras 3.15). Its outputs, and so every gradient, carry float32 rounding: a few ulps
    (1.2e-7 relative) of values and gradients of order 1. Eight SGD steps at lr 0.1 with momentum 0.9 move a weight
    by at most sum_t 0.1 (1 + 0.9 + ... ) <= 8 x 0.1 x 10 = 8 gradient-sized amounts, so the models may differ by
    about 1e-6 in the worst case; 1e-6 absolute is asserted (measured: 2e-8 for weights, 1.2e-7 for the moving
    variance). A wrong padding, momentum or variance convention differs by 1e-3 or more."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # the global policy, fixed by the first layer ever built, follows floatx
    try:
        with keras_build_scope(0):
            k = keras_net()
            model, _ = adapt(k, "keras_net", CLASSES, 1, (SIZE, SIZE), "batch", 8)
        twin = torch_twin(k)
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, SIZE, SIZE, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (16,), generator=gen)
    hp = ClientHParams(seed=0, lr=0.1, momentum=0.9, batch_size=4, epochs=2, num_classes=CLASSES)
    task = ClientTask(0, np.arange(16))
    start = {key: v.clone() for key, v in twin.state_dict().items()}  # the weights both start from
    ours = local_update(model, x, y, RoundContext(1, dict(model.state_dict())), task, hp)
    theirs = local_update(twin, x, y, RoundContext(1, dict(twin.state_dict())), task, hp)
    assert ours.steps == theirs.steps == 8
    assert ours.train_loss == pytest.approx(theirs.train_loss, rel=1e-6)
    a, b = ours.state, theirs.state
    pairs = {"conv2d.kernel": b["0.weight"].permute(2, 3, 1, 0), "conv2d.bias": b["0.bias"],
             "batch_normalization.gamma": b["1.weight"], "batch_normalization.beta": b["1.bias"],
             "batch_normalization.moving_mean": b["1.running_mean"],
             "dense.kernel": b["5.weight"].T, "dense.bias": b["5.bias"]}
    for key, theirs_value in pairs.items():
        assert a[key].dtype == torch.float64
        torch.testing.assert_close(a[key], theirs_value, rtol=0, atol=1e-6, msg=key)
    assert not torch.allclose(a["dense.kernel"], start["5.weight"].T)  # training moved the weights
    # The running variances differ by convention only: every batch has n = 4 x 6 x 6 values per channel, torch keeps
    # n / (n - 1) times the biased batch variance that Keras keeps, so after T = 8 updates from var_0 = 1:
    # keras - (1 - m)^T = (n - 1) / n x (torch - (1 - m)^T).
    n, decay = 4 * SIZE * SIZE, (1 - MOMENTUM) ** 8
    expected = decay + (n - 1) / n * (b["1.running_var"] - decay)
    torch.testing.assert_close(a["batch_normalization.moving_variance"], expected, rtol=0, atol=1e-6)
    assert start["1.running_var"].eq(1).all()


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> str:
    return str(factories(tmp_path_factory))


class Results(RoundCallback):
    """A round callback that keeps the clients' results."""

    def __init__(self):
        self.results = []

    def on_round_end(self, info):
        self.results += info.output.results
        return {}


def test_fedbn_keeps_each_clients_batchnorm_and_averages_the_rest(nets, tiny_idx):
    """Two clients, one round, model.norm_policy=local: exact (the server's mean is float64, cast once)."""
    cfg = load_config(overrides=[*tiny_args(tiny_idx), f"model.name={nets}:small", "model.norm_policy=local",
                                 "data.num_clients=2", "server.clients_per_round=2", "server.rounds=1",
                                 "engine.threads=1"])
    seen = Results()
    exp = Experiment(cfg, None, callbacks=[seen], show_progress=False)
    exp.run()
    bn_keys = {"batch_normalization.gamma", "batch_normalization.beta", "batch_normalization.moving_mean",
               "batch_normalization.moving_variance"}
    assert exp.norm_keys == bn_keys and not bn_keys & set(exp.server_keys)  # never stepped by the server
    first, second = seen.results
    for res in (first, second):
        kept = exp.server.clients[res.client_id]["norm"]
        assert set(kept) == bn_keys and all(torch.equal(kept[k], res.state[k]) for k in bn_keys)
        # the client's next round starts from the global model with its own BatchNorm layers
        start = norm_policy("local").client_start(exp.server.model, exp.server.clients[res.client_id])
        assert all(torch.equal(start[k], res.state[k]) for k in bn_keys)
        assert torch.equal(start["dense.kernel"], exp.server.model["dense.kernel"])
    mean = weighted_mean([first.state, second.state], [first.num_samples, second.num_samples])
    assert all(torch.equal(exp.server.model[k], mean[k]) for k in mean)  # the rest (and the global BN) is the mean
    assert not torch.equal(first.state["batch_normalization.moving_mean"],
                           second.state["batch_normalization.moving_mean"])


def test_recalibration_gives_the_population_statistics_of_a_keras_batchnorm_input(nets, mnist):
    """Tolerance, derived: the hooked pass and the reference compute the same float32 convolution outputs
    (batches of different sizes may reach other kernels: a few ulps, 1.2e-7 relative each); both sums are float64,
    so the statistics agree to about 1e-6 relative. The biased and unbiased variances of n = 230 x 28 x 28 values
    differ by 1 / n = 5.5e-6: the assertion (rtol 1e-6) tells the two conventions apart."""
    torch.manual_seed(0)
    from fedgap.models import build_model

    model = build_model(load_config(overrides=[f"model.name={nets}:small"]).model)
    (bn,) = batchnorm_layers(model).values()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    clients = [mnist.train_x[:100], mnist.train_x[1000:1130]]
    new = recalibrate(state, [bn], lambda st, name: [layer_input_moments(model, st, x, name) for x in clients])
    conv = model.keras_model.get_layer("conv2d")
    with torch.no_grad():
        z = conv(torch.cat(clients).permute(0, 2, 3, 1)).double()  # the BatchNorm's input, channels last
    torch.testing.assert_close(new[bn.mean_key].double(), z.mean((0, 1, 2)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(new[bn.var_key].double(), z.var((0, 1, 2), unbiased=False), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(new[bn.var_key].double(), z.var((0, 1, 2), unbiased=True), rtol=1e-6, atol=0)
