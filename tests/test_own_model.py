"""Your own model (issue 14): the registry, factories from an import path, their one-line errors, BatchNorm
conversion (model.norm), model-info and the vectorized engine's message for a layer it cannot batch."""

import pytest
import torch
from torch import nn

from conftest import cli
from fedgap.config import load_config
from fedgap.engines.cohort_model import CohortModel
from fedgap.errors import ConfigError
from fedgap.models import build_model, build_model_reported
from fedgap.models.convert import convert_norm
from fedgap.models.info import count_macs
from fedgap.models.registry import MODELS

RGB16 = (3, 16, 16)


def model_cfg(*overrides):
    return load_config(overrides=list(overrides)).model


# ------------------------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("name", list(MODELS))
def test_every_registered_model_builds_with_the_channels_the_validator_checks(name):
    norm = "group" if MODELS[name].norm_channels(0.5) else "none"  # simple-cnn has no norm layers to convert
    cfg = model_cfg(f"model.name={name}", f"model.norm={norm}", "model.groups=1", "model.width=0.5")
    model = build_model(cfg, (3, 28, 28), 7)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 7)
    built = sorted(m.num_channels for m in model.modules() if isinstance(m, nn.GroupNorm))
    assert built == sorted(MODELS[name].norm_channels(0.5))


def test_unknown_name_lists_the_registry():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.name=resnet"])
    assert all(name in str(err.value) for name in MODELS) and "path/to/file.py:factory" in str(err.value)


# ------------------------------------------------------------------------------------------------ factories
def test_file_factory_with_kwargs_builds_and_its_path_is_made_absolute(own_model, tmp_path, monkeypatch):
    directory, file_name = own_model.rsplit("/", 1)
    monkeypatch.chdir(directory)
    cfg = model_cfg(f"model.name={file_name}", "model.kwargs.width=4")
    assert cfg.name == own_model and cfg.kwargs == {"width": 4}
    model = build_model(cfg, RGB16, 3)
    assert model.body[0].out_channels == 4 and model(torch.randn(5, *RGB16)).shape == (5, 3)


def test_module_factory_from_sys_path_or_the_current_folder(own_model, tmp_path, monkeypatch):
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(open(own_model.rsplit(":", 1)[0]).read())
    monkeypatch.chdir(tmp_path)  # not on sys.path: found in the current folder, as `python -m` would
    cfg = model_cfg("model.name=userpkg.nets:make", "model.norm=layer")
    assert cfg.name == "userpkg.nets:make"
    assert build_model(cfg, RGB16, 3)(torch.randn(2, *RGB16)).shape == (2, 3)


BAD_FACTORIES = '''
from torch import nn
def raises(num_classes, in_channels, image_size):
    raise RuntimeError("no weights here")
def wrong_shape(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size[0] * image_size[1], num_classes + 1))
def not_a_module(num_classes, in_channels, image_size):
    return 42
def wrong_input(num_classes, in_channels, image_size):
    return nn.Conv2d(in_channels + 1, num_classes, 3)
NOT_CALLABLE = 3
'''


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "bad_factories.py"
    path.write_text(BAD_FACTORIES)
    return str(path)


@pytest.mark.parametrize(("target", "message"), [
    ("no_such_pkg.models:make", "model.name: no module named 'no_such_pkg.models'"),
    ("{dir}/missing.py:make", "model.name: file '{dir}/missing.py' not found"),
    ("fedgap.models:", "is not 'package.module:factory' or 'path/to/file.py:factory'"),
])
def test_bad_model_paths_fail_in_config_validation(bad_file, target, message):
    """What config validation can tell without importing anything: the path's form, a missing file or package
    (the rest, in ``test_bad_factories_fail_when_built``, fails where the model is built, before any output)."""
    directory = bad_file.rsplit("/", 1)[0]
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"model.name={target.format(dir=directory, file=bad_file)}"])
    assert message.format(dir=directory, file=bad_file) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("factory", "message"), [
    ("nothing", "model.name: '{file}' has no function 'nothing'"),
    ("NOT_CALLABLE", "model.name: 'NOT_CALLABLE' in '{file}' is not callable"),
    ("raises", "raised RuntimeError: no weights here"),
    ("wrong_shape", "gives output (2, 4) for a batch of 2 images, expected logits (2, 3)"),
    ("not_a_module", "returned int, not a torch.nn.Module"),
    ("wrong_input", "fails on a batch of 2 images [2, 3, 16, 16]: RuntimeError"),
])
def test_bad_factories_fail_when_built(bad_file, factory, message):
    cfg = model_cfg(f"model.name={bad_file}:{factory}")
    with pytest.raises(ConfigError) as err:
        build_model(cfg, RGB16, 3)
    assert message.format(file=bad_file) in str(err.value) and "\n" not in str(err.value)


def test_builtin_options_and_kwargs_do_not_mix(own_model):
    with pytest.raises(ConfigError, match="model.dropout: only the built-in models take it"):
        load_config(overrides=[f"model.name={own_model}", "model.dropout=0.5"])
    with pytest.raises(ConfigError, match="model.kwargs: only a model from an import path takes kwargs"):
        load_config(overrides=["model.kwargs.width=3"])


# ------------------------------------------------------------------------------------------------ conversion
@pytest.mark.parametrize(("norm", "groups_of"), [
    ("group", lambda c: 4), ("layer", lambda c: 1), ("instance", lambda c: c)])
def test_batchnorm_becomes_groupnorm_with_the_same_channels(own_model, norm, groups_of):
    reference = build_model(model_cfg(f"model.name={own_model}"), RGB16, 3)
    with torch.no_grad():
        reference.body[1].weight.fill_(0.5)  # a factory's own init of the affine survives the conversion
    replaced = convert_norm(reference, norm, groups=4)
    assert [(r.layer, r.was, r.now) for r in replaced] == [
        ("body.1", "BatchNorm2d(8)", f"GroupNorm({groups_of(8)}, 8)"),
        ("body.5", "BatchNorm2d(16)", f"GroupNorm({groups_of(16)}, 16)")]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in reference.modules())
    assert reference.body[5].num_channels == 16 and (reference.body[1].weight == 0.5).all()
    assert reference(torch.randn(4, *RGB16)).shape == (4, 3)
    built, reported = build_model_reported(model_cfg(f"model.name={own_model}", f"model.norm={norm}",
                                                     "model.groups=4"), RGB16, 3)
    assert [r.now for r in reported] == [r.now for r in replaced]


def test_norm_none_and_batch_and_batchnorm1d():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    assert convert_norm(model, "batch") == [] and isinstance(model[2], nn.BatchNorm1d)
    assert [r.now for r in convert_norm(model, "layer")] == ["GroupNorm(1, 6)"]
    assert model(torch.randn(3, 3, 2, 2)).shape == (3, 2)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6))
    assert [r.now for r in convert_norm(model, "none")] == ["Identity"] and isinstance(model[1], nn.Identity)


def test_groups_that_do_not_divide_name_the_layer_and_leave_the_model_intact(own_model):
    model = build_model(model_cfg(f"model.name={own_model}", "model.kwargs.width=6"), RGB16, 3)
    with pytest.raises(ConfigError) as err:
        convert_norm(model, "group", groups=4)
    assert str(err.value) == ("model.groups: 4 does not divide the 6 channels of layer 'body.1' (BatchNorm2d); "
                              "divisors of every BatchNorm's channels: 1, 2, 3, 6")
    assert isinstance(model.body[1], nn.BatchNorm2d) and isinstance(model.body[5], nn.BatchNorm2d)


# ------------------------------------------------------------------------------------------------ model-info
def test_macs_are_conv_and_linear_multiply_adds(own_model):
    model = build_model(model_cfg(f"model.name={own_model}"), RGB16, 3)
    # conv 3->8 3x3 at 16x16, conv 8->16 3x3 at 8x8, linear 16->3
    assert count_macs(model, RGB16) == 16 * 16 * 8 * 3 * 9 + 8 * 8 * 16 * 8 * 9 + 16 * 3


def test_model_info_command(own_model, own_npz, capsys):
    code, out, err = cli("model-info", "data.name=npz", f"data.path={own_npz}", f"model.name={own_model}",
                         "model.norm=group", "model.groups=4", capsys=capsys)
    assert code == 0, err
    for text in ("body.1", "BatchNorm2d(8)", "GroupNorm(4, 8)", "3 x 16 x 16 (npz), 3 classes", "1,467", "129,072",
                 "can batch this model"):
        assert text in out, text
    code, out, _ = cli("model-info", "--help", capsys=capsys)
    assert code == 0 and "Usage:" in out


# ------------------------------------------------------------------------------------------------ vectorized
def test_vectorized_names_the_layer_it_cannot_batch_and_an_untraceable_model():
    class Gelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act, self.head = nn.Conv2d(3, 4, 3), nn.GELU(), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.act(self.conv(x)).mean((2, 3)))

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ConfigError, match=r"cannot batch the model's layer 'act' \(GELU\); use engine.name=sequential"):
        CohortModel(Gelu())
    with pytest.raises(ConfigError, match="vectorized cannot trace the model with torch.fx .*engine.name=sequential"):
        CohortModel(Branchy())
