"""A Keras model as a fedgap model (issue 23): state keys and tensors shared with Keras, train/eval and the
BatchNorm-only train mode, the final softmax, model.norm, model.bn_momentum / model.bn_eps, deterministic builds
and dropout, and the one-line refusals."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fedgap.models.keras_backend import use_torch_backend

use_torch_backend()
keras = pytest.importorskip("keras")

from conftest import FAST, cli  # noqa: E402
from fedgap.config import load_config  # noqa: E402
from fedgap.errors import ConfigError  # noqa: E402
from fedgap.experiment.outputs import RUN_FILES  # noqa: E402
from fedgap.fl.batchnorm import batchnorm_layers  # noqa: E402
from fedgap.fl.client import ClientHParams, ClientTask, RoundContext, local_update  # noqa: E402
from fedgap.fl.evaluate import evaluate  # noqa: E402
from fedgap.models import build_model, build_model_reported  # noqa: E402
from fedgap.models.keras_adapter import KerasModel, adapt  # noqa: E402
from fedgap.models.norm import float_norm_keys  # noqa: E402
from keras_models import FACTORIES, SEED_STYLE, factories  # noqa: E402

MNIST = (1, 28, 28)


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> str:
    return str(factories(tmp_path_factory))


def build(name: str, *overrides: str, shape=MNIST, classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    return build_model_reported(load_config(overrides=[f"model.name={name}", *overrides]).model, shape, classes)


# ------------------------------------------------------------------------------------------------ state
def test_state_keys_parameters_and_buffers(nets):
    model, _ = build(f"{nets}:small")
    assert isinstance(model, KerasModel)
    assert list(model.state_dict()) == ["conv2d.kernel", "batch_normalization.gamma", "batch_normalization.beta",
                                        "batch_normalization.moving_mean", "batch_normalization.moving_variance",
                                        "dense.kernel", "dense.bias"]
    # BatchNorm statistics are buffers: averaged by the server, never stepped by an optimizer
    assert [k for k, _ in model.named_parameters()] == ["conv2d.kernel", "batch_normalization.gamma",
                                                        "batch_normalization.beta", "dense.kernel", "dense.bias"]
    assert float_norm_keys(model) == {"batch_normalization.gamma", "batch_normalization.beta",
                                      "batch_normalization.moving_mean", "batch_normalization.moving_variance"}
    params = dict(model.named_parameters())
    assert params["dense.kernel"] is model.keras_model.get_layer("dense").kernel.value  # the very Parameter


def test_load_state_dict_reaches_keras_and_keras_updates_reach_the_state(nets):
    model, _ = build(f"{nets}:small")
    bn = model.keras_model.get_layer("batch_normalization")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["batch_normalization.moving_mean"] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    state["dense.bias"] = torch.arange(10.0)
    model.load_state_dict(state)
    assert bn.moving_mean.numpy().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert model.keras_model.get_layer("dense").bias.numpy().tolist() == list(range(10))
    model.train()
    x = torch.randn(6, *MNIST)
    model(x)  # Keras' own moving-average update (Variable.assign) must show in the buffer
    assert torch.equal(model.state_dict()["batch_normalization.moving_mean"], torch.as_tensor(bn.moving_mean.numpy()))
    assert not torch.equal(model.state_dict()["batch_normalization.moving_mean"], torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_every_build_of_a_config_has_the_same_keys_and_initial_weights(nets):
    a, _ = build(SEED_STYLE)
    b, _ = build(SEED_STYLE)
    c, _ = build(SEED_STYLE, seed=1)
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.state_dict()["conv2d.kernel"], c.state_dict()["conv2d.kernel"])


def test_initial_weights_do_not_depend_on_what_an_import_draws_from_random(tmp_path):
    """A module that draws from Python's `random` when imported (rich.style does, and Keras imports rich) must not
    move the initializers' seeds: the user's file is imported before the build scope seeds `random`."""
    plain = tmp_path / "plain.py"
    plain.write_text(FACTORIES)
    drawing = tmp_path / "drawing.py"
    drawing.write_text("import random\nrandom.random()  # an import-time draw\n" + FACTORIES)
    a, _ = build(f"{plain}:small")
    b, _ = build(f"{drawing}:small")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_a_fresh_process_builds_the_weights_of_one_that_built_the_model_before():
    """The Flower ServerApp builds the initial model in a fresh process; `fedgap run` builds it after Keras and
    rich were imported and after its preflight build (the CI failure of the Keras deployment test): the same
    weights, whatever Keras imports lazily on a first build."""
    script = ("import sys, torch\n"
              "from fedgap.config import load_config\nfrom fedgap.models import build_model\n"
              f"cfg = load_config(overrides=['model.name={SEED_STYLE}']).model\n"
              "if sys.argv[1] == 'again':\n    import keras, rich.style\n    build_model(cfg)\n"
              "torch.manual_seed(0)\n"
              "print(sum(float(v.double().sum()) for v in build_model(cfg).state_dict().values()))\n")
    sums = []
    for order in ("again", "fresh"):
        done = subprocess.run([sys.executable, "-c", script, order], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "KERAS_BACKEND": "torch"})
        assert done.returncode == 0, done.stderr[-2000:]
        sums.append(done.stdout.split()[-1])
    assert sums[0] == sums[1]


def test_channels_last_input_and_the_training_flag(nets):
    model, _ = build(f"{nets}:small")
    x = torch.randn(5, *MNIST)
    model.eval()
    expected = model.keras_model(x.permute(0, 2, 3, 1), training=False)
    assert torch.equal(model(x), expected)
    model.train()
    with torch.no_grad():
        before = model.state_dict()["batch_normalization.moving_mean"].clone()
        model(x)
    assert not torch.equal(before, model.state_dict()["batch_normalization.moving_mean"])  # training=True


def test_channels_first_models_get_the_batch_as_it_is(nets):
    layout = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        model, _ = build(f"{nets}:any_layout")
        x = torch.randn(3, *MNIST)
        model.eval()
        assert not model.channels_last and torch.equal(model(x), model.keras_model(x, training=False))
        inputs = keras.Input(shape=(1, 28, 28))  # a channels-first model for one channel, given RGB images
        one_channel = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
        with pytest.raises(ConfigError, match=r"expects inputs of shape \(1, 28, 28\) \(channels, height, width\), "
                                              r"the data set's images are \(3, 28, 28\)"):
            adapt(one_channel, "cf", 10, 3, (28, 28), "batch", 8)
    finally:
        keras.config.set_image_data_format(layout)


def test_train_mode_evaluation_uses_batch_statistics_and_restores_the_state(nets, mnist):
    model, _ = build(f"{nets}:small")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = mnist.test_x[:100], mnist.test_y[:100]
    bad = dict(state, **{"batch_normalization.moving_mean": torch.full((4,), 50.0)})
    assert evaluate(model, bad, x, y).loss != pytest.approx(evaluate(model, state, x, y).loss, rel=1e-3)
    train_mode = evaluate(model, state, x, y, train_mode=True)
    assert evaluate(model, bad, x, y, train_mode=True).loss == pytest.approx(train_mode.loss, rel=1e-6)
    assert torch.equal(model.state_dict()["batch_normalization.moving_mean"], torch.full((4,), 50.0))  # restored
    assert not model.training and not model.keras_model.get_layer("batch_normalization").training


# ------------------------------------------------------------------------------------------------ softmax
@pytest.mark.parametrize("factory", ["small", "sequential"])
def test_the_final_softmax_is_left_out_for_training_and_written_back_on_save(nets, factory, tmp_path):
    model, _ = build(f"{nets}:{factory}")
    model.eval()
    x = torch.randn(4, *MNIST)
    with torch.no_grad():
        logits = model(x)
    assert not torch.allclose(logits.sum(1), torch.ones(4))
    assert len(model.notes) == 1 and "left out" in model.notes[0]
    model.save_keras(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    probs = torch.as_tensor(keras.ops.convert_to_numpy(loaded(x.permute(0, 2, 3, 1).numpy(), training=False)))
    torch.testing.assert_close(probs, torch.softmax(logits, 1), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(model(x), logits)  # saving put the softmax back only for the file


def test_a_model_of_logits_is_unchanged(nets):
    model, _ = build(f"{nets}:logits")
    assert model.notes == [] and model.softmax is None


# ------------------------------------------------------------------------------------------------ BatchNorm
def test_batchnorm_layers_of_a_keras_model_in_torchs_convention(nets):
    model, _ = build(f"{nets}:small")
    (bn,) = batchnorm_layers(model).values()
    assert (bn.name, bn.mean_key, bn.var_key) == ("batch_normalization", "batch_normalization.moving_mean",
                                                  "batch_normalization.moving_variance")
    assert bn.momentum == pytest.approx(0.01) and bn.eps == 1e-3 and not bn.unbiased_var  # Keras' 0.99 and 1e-3
    assert bn.channel_axis == -1


def test_bn_momentum_and_eps_override_keras_and_torch_models(nets):
    model, _ = build(f"{nets}:small", "model.bn_momentum=0.25", "model.bn_eps=1e-5")
    keras_bn = model.keras_model.get_layer("batch_normalization")
    assert keras_bn.momentum == 0.75 and keras_bn.epsilon == 1e-5  # Keras' convention: the weight of the old
    # One training batch from moving mean 0: the new moving mean is momentum x the batch mean (torch convention).
    x = torch.randn(8, *MNIST)
    model.train()
    with torch.no_grad():
        model(x)
        z = keras.ops.convert_to_tensor(model.keras_model.get_layer("conv2d")(x.permute(0, 2, 3, 1)))
    torch.testing.assert_close(model.state_dict()["batch_normalization.moving_mean"], 0.25 * z.mean((0, 1, 2)),
                               rtol=1e-5, atol=1e-7)
    torch_model = build_model(load_config(overrides=["model.bn_momentum=0.01", "model.bn_eps=1e-3"]).model)
    assert {(bn.momentum, bn.eps) for bn in batchnorm_layers(torch_model).values()} == {(0.01, 1e-3)}
    assert {(m.momentum, m.eps) for m in torch_model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == \
        {(0.01, 1e-3)}


@pytest.mark.parametrize("norm,groups,kind", [("group", 4, "GroupNormalization"), ("layer", 8, "GroupNormalization"),
                                               ("instance", 8, "GroupNormalization"), ("none", 8, "Identity")])
def test_model_norm_rebuilds_a_keras_model_without_batchnorm(nets, norm, groups, kind):
    original, _ = build(SEED_STYLE)
    model, replaced = build(SEED_STYLE, f"model.norm={norm}", f"model.groups={groups}")
    assert len(replaced) == 5 and all(r.now.startswith(kind) for r in replaced)
    assert not batchnorm_layers(model) and not any("moving" in k for k in model.state_dict())
    gn = [layer for layer in model.keras_model.layers if isinstance(layer, keras.layers.GroupNormalization)]
    if gn:
        assert [g.groups for g in gn][:1] == [{"group": 4, "layer": 1, "instance": 32}[norm]]
    # every other layer keeps the factory's weights
    assert torch.equal(model.state_dict()["conv2d.kernel"], original.state_dict()["conv2d.kernel"])
    assert torch.equal(model.state_dict()["dense.kernel"], original.state_dict()["dense.kernel"])
    assert model(torch.randn(2, *MNIST)).shape == (2, 10)


# ------------------------------------------------------------------------------------------------ randomness
def test_dropout_masks_follow_fedgaps_per_client_seeds(nets, mnist):
    model, _ = build(f"{nets}:small", "model.kwargs.dropout=0.5")
    cfg = load_config(overrides=[f"model.name={nets}:small", "model.kwargs.dropout=0.5"])
    hp = ClientHParams.from_config(cfg, float_norm_keys(model))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = RoundContext(1, start)
    rows = torch.arange(64).numpy()

    def train(client_id):
        return local_update(model, mnist.train_x, mnist.train_y, ctx, ClientTask(client_id, rows), hp).state

    a, b, other = train(3), train(3), train(4)  # client 4 holds the same rows: only its seeds differ
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["dense.kernel"], other["dense.kernel"])
    assert "seed_generator_state" not in " ".join(model.state_dict())


# ------------------------------------------------------------------------------------------------ refusals
BAD = {
    "raises": "model.name: {path}:raises raised RuntimeError: weights missing",
    "layer_only": "returned a Keras Dense, not a keras.Model",
    "text": "returned str, not a torch.nn.Module or a keras.Model",
    "stateful": "layer 'simple_rnn' (SimpleRNN) is stateful",
    "regularized": "layer 'dense' (Dense) has a kernel_regularizer",
    "rgb32": "expects inputs of shape (32, 32, 3) (height, width, channels), the data set's images are (28, 28, 1)",
    "two_inputs": "has 2 input(s) and 1 output(s)",
    "probabilities": "returns probabilities",
}


@pytest.mark.parametrize("factory", list(BAD))
def test_what_cannot_work_is_one_line_exit_2_and_no_run_files(nets, factory, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli("run", f"model.name={nets}:{factory}", *FAST, "server.rounds=1", "--out", str(out),
                       capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fedgap: error:"), err
    assert BAD[factory].format(path=nets) in lines[0], lines[0]
    assert not any((out / f).exists() for f in RUN_FILES)


def test_groups_that_do_not_divide_a_keras_batchnorm(capsys):
    with pytest.raises(ConfigError, match="model.groups: 3 does not divide the 32 channels of layer "
                                          "'batch_normalization' \\(BatchNormalization\\)"):
        build(SEED_STYLE, "model.norm=group", "model.groups=3")


def test_the_vectorized_engine_refuses_a_keras_model_before_writing(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli("run", f"model.name={SEED_STYLE}", *FAST, "engine.name=vectorized", "--out", str(out),
                       capsys=capsys)
    assert code == 2 and err.strip().splitlines() == [
        "fedgap: error: engine.name: vectorized cannot batch a Keras model (torch.fx cannot trace Keras layers); "
        "use engine.name=sequential, parallel or ray"]
    assert not any((out / f).exists() for f in RUN_FILES)


def test_keras_imported_with_another_backend_is_one_line(monkeypatch, nets):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ConfigError, match="^model.name: Keras was imported with the jax backend before fedgap could "
                                          "set KERAS_BACKEND=torch"):
        build(f"{nets}:small")


def test_model_info_shows_batchnorm_settings_and_the_softmax_note(capsys):
    code, out, err = cli("model-info", f"model.name={SEED_STYLE}", "model.bn_momentum=0.1", capsys=capsys)
    assert code == 0, err
    assert "batch_normalization_4" in out and "0.1" in out and "biased" in out
    assert "13,642" in out and "945,216" in out  # parameters; MACs per image (as the torch mobilenet-like's)
    assert "left out" in out and "vectorized cannot batch a Keras model" in out
