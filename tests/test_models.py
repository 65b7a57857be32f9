import pytest
import torch

from fedgap.config import load_config
from fedgap.models import build_model, count_parameters
from fedgap.models.norm import norm_state_keys
from fedgap.models.registry import MODELS


def test_fedavg_cnn_has_the_papers_parameter_count():
    cfg = load_config(overrides=["model.name=cnn", "model.norm=none"])
    assert count_parameters(build_model(cfg.model)) == 1_663_370


def test_mobilenet_like_structure():
    model = build_model(load_config().model)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0], c.groups) for c in convs] == [
        (1, 32, 2, 1), (32, 32, 1, 32), (32, 64, 1, 1), (64, 64, 2, 64), (64, 128, 1, 1)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 5


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("norm", ["batch", "group", "layer", "instance", "none"])
def test_every_model_and_norm_runs(name, norm):
    cfg = load_config(overrides=[f"model.name={name}", f"model.norm={norm}", "model.width=0.5", "model.dropout=0.2"])
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
