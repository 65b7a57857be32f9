import pytest
import torch

from fedgap.config import load_config
from fedgap.errors import ConfigError
from fedgap.models import build_model, count_parameters
from fedgap.models.norm import norm_state_keys
from fedgap.models.registry import MODELS


def test_fedavg_cnn_has_the_papers_parameter_count():
    cfg = load_config(overrides=["model.name=cnn", "model.norm=none"])
    assert count_parameters(build_model(cfg.model)) == 1_663_370


def test_simple_cnn_is_niid_benchs_model():
    cfg = load_config(overrides=["model.name=simple-cnn"])
    assert cfg.model.norm == "none"  # resolved: it has no norm layers
    model = build_model(cfg.model)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    shapes = [(m.in_channels, m.out_channels, m.kernel_size, m.padding) if isinstance(m, torch.nn.Conv2d)
              else (m.in_features, m.out_features) for m in layers]
    assert shapes == [(1, 6, (5, 5), (0, 0)), (6, 16, (5, 5), (0, 0)), (256, 120), (120, 84), (84, 10)]
    assert count_parameters(model) == 44_426  # 156 + 2,416 + 30,840 + 10,164 + 850
    assert not norm_state_keys(model) and all(m.bias is not None for m in layers)


def test_mobilenet_like_structure():
    model = build_model(load_config().model)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0], c.groups) for c in convs] == [
        (1, 32, 2, 1), (32, 32, 1, 32), (32, 64, 1, 1), (64, 64, 2, 64), (64, 128, 1, 1)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 5


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("norm", ["batch", "group", "layer", "instance", "none"])
def test_every_model_and_norm_runs(name, norm):
    overrides = [f"model.name={name}", f"model.norm={norm}", "model.width=0.5", "model.dropout=0.2"]
    if not MODELS[name].norm_channels(0.5) and norm != "none":  # a model without norm layers refuses them
        with pytest.raises(ConfigError, match=f"model.norm: {name} has no norm layers, so only none applies"):
            load_config(overrides=overrides)
        return
    cfg = load_config(overrides=overrides)
    model = build_model(cfg.model)
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    out.sum().backward()
    keys = norm_state_keys(model)
    assert bool(keys) == (norm != "none")
    if norm == "batch":
        assert any(k.endswith("running_mean") for k in keys)


def test_models_take_other_image_sizes():
    cfg = load_config(overrides=["model.name=cnn"])
    assert build_model(cfg.model, (1, 32, 32), 5)(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_eval_results_of_slices_merge_into_the_whole(mnist):
    from fedgap.config import load_config
    from fedgap.engines.runner import ClientRunner
    from fedgap.fl.evaluate import EvalResult

    runner = ClientRunner(load_config(), mnist)
    state = runner.model.state_dict()
    whole = runner.evaluate_test_rows(state, 0, 1000)
    parts = EvalResult.merge([runner.evaluate_test_rows(state, a, b) for a, b in ((0, 300), (300, 999), (999, 1000))])
    assert parts.count == whole.count == 1000
    assert parts.accuracy == whole.accuracy
    assert abs(parts.loss - whole.loss) < 1e-5
