"""``build_model``: a registry name or the user's import path, with ``model.norm`` applied either way."""

from __future__ import annotations

import importlib
import sys

import torch
from torch import nn

from fedgap.models import custom
from fedgap.models.convert import Replacement, convert_norm
from fedgap.models.keras_backend import is_keras_object, keras_build_scope
from fedgap.models.norm import override_batchnorm
from fedgap.models.registry import MODELS


def build_model(cfg, image_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """Build ``cfg.name`` with ``cfg.norm``; initialization uses torch's global RNG (seed it first)."""
    return build_model_reported(cfg, image_shape, num_classes)[0]


def build_model_reported(cfg, image_shape: tuple[int, int, int] = (1, 28, 28),
                         num_classes: int = 10) -> tuple[nn.Module, list[Replacement]]:
    """The model and the BatchNorm layers that ``model.norm`` replaced in it (always none for the built-in
    models, which build their norm layers as asked); ``model.bn_momentum`` / ``model.bn_eps`` set on every
    BatchNorm layer."""
    c, h, w = image_shape
    entry = MODELS.get(cfg.name)
    if entry is not None:
        module_name, _, attr = entry.target.partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
        options = {k: getattr(cfg, k) for k in entry.options}
        if entry.takes_image_size:
            options["image_size"] = (h, w)
        model, replaced = cls(in_channels=c, num_classes=num_classes, **options), []
    else:
        # A Keras factory's layer names and initial weights come from process-wide state: the scope makes every
        # build of a config the same (fedgap.models.keras_backend); seeded from torch's seed, which callers set.
        # The user's file, Keras and the adapter are imported before the scope seeds `random`: importing a module
        # can draw from it (rich.style does, and Keras imports rich), and a process that had imported them
        # earlier would otherwise start the model from other weights.
        factory = custom.resolve(cfg.name)
        if "keras" in sys.modules:
            import fedgap.models.keras_adapter  # noqa: F401  (imported here for the reason above)
        with keras_build_scope(torch.initial_seed()):
            model = custom.call_factory(factory, cfg.name, num_classes, c, (h, w), dict(cfg.kwargs))
            if is_keras_object(model):
                from fedgap.models.keras_adapter import adapt

                model, replaced = adapt(model, cfg.name, num_classes, c, (h, w), cfg.norm, cfg.groups)
            else:
                replaced = convert_norm(model, cfg.norm, cfg.groups)
    override_batchnorm(model, cfg.bn_momentum, cfg.bn_eps)
    if entry is None:
        custom.check_output(model, cfg.name, num_classes, c, (h, w))
    return model, replaced


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
