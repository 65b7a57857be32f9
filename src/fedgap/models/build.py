"""``build_model``: a registry name or the user's import path, with ``model.norm`` applied either way."""

from __future__ import annotations

import importlib

from torch import nn

from fedgap.models import custom
from fedgap.models.convert import Replacement, convert_norm
from fedgap.models.registry import MODELS


def build_model(cfg, image_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """Build ``cfg.name`` with ``cfg.norm``; initialization uses torch's global RNG (seed it first)."""
    return build_model_reported(cfg, image_shape, num_classes)[0]


def build_model_reported(cfg, image_shape: tuple[int, int, int] = (1, 28, 28),
                         num_classes: int = 10) -> tuple[nn.Module, list[Replacement]]:
    """The model and the BatchNorm layers that ``model.norm`` replaced in it (always none for the built-in
    models, which build their norm layers as asked)."""
    c, h, w = image_shape
    entry = MODELS.get(cfg.name)
    if entry is not None:
        module_name, _, attr = entry.target.partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
        options = {k: getattr(cfg, k) for k in entry.options}
        if entry.takes_image_size:
            options["image_size"] = (h, w)
        return cls(in_channels=c, num_classes=num_classes, **options), []
    model = custom.call_factory(cfg.name, num_classes, c, (h, w), dict(cfg.kwargs))
    replaced = convert_norm(model, cfg.norm, cfg.groups)
    custom.check_output(model, cfg.name, num_classes, c, (h, w))
    return model, replaced


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
