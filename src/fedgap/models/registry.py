"""The model registry: every name ``model.name`` accepts, without importing torch.

A built-in model is an entry pointing at its class by import path, with the config options it takes and the
channel counts of its norm layers (so the config validator can check ``model.groups`` before anything is built).
Any other ``model.name`` is an import path of the user's own factory (``package.module:factory`` or
``path/to/file.py:factory``, see ``fedgap.models.custom``). Config validation, ``fedgap keys`` and the tests read
this one dict, so adding a built-in model is one entry here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from fedgap.errors import ConfigError
from fedgap.models import spec


@dataclass(frozen=True)
class ModelEntry:
    target: str  # "module:attribute" of the class, built as target(in_channels=, num_classes=, **options)
    description: str
    options: tuple[str, ...]  # model.* config fields passed to the class besides in_channels and num_classes
    norm_channels: Callable[[float], list[int]]  # width -> channel count of every norm layer (none: [])
    takes_image_size: bool = False  # the class needs image_size=(h, w) (its classifier is not pooled)


_COMMON = ("norm", "groups", "dropout")

MODELS: dict[str, ModelEntry] = {
    "mobilenet-like": ModelEntry(
        "fedgap.models.mobilenet:MobileNetLike", "the seed three-block net",
        _COMMON, spec.mobilenet_like_channels),
    "mobilenet-v1": ModelEntry(
        "fedgap.models.mobilenet:MobileNetV1", "adapted to 28x28, model.width",
        (*_COMMON, "width"), spec.v1_channels),
    "mobilenet-v2": ModelEntry(
        "fedgap.models.mobilenet:MobileNetV2", "adapted to 28x28, model.width",
        (*_COMMON, "width"), spec.v2_channels),
    "cnn": ModelEntry(
        "fedgap.models.cnn:FedAvgCNN", "the FedAvg paper's CNN",
        _COMMON, spec.cnn_channels, takes_image_size=True),
    "simple-cnn": ModelEntry(
        "fedgap.models.simple_cnn:SimpleCNN", "NIID-Bench's MNIST CNN, no norm layers",
        ("dropout",), spec.no_norm_channels, takes_image_size=True),
}


def is_import_path(name: str) -> bool:
    """True for a user's factory (``module:function`` or ``file.py:function``), False for a registry name."""
    return ":" in name and name not in MODELS


def names_text(described: bool = False) -> str:
    """'mobilenet-like | mobilenet-v1 | ...' (with each model's description in parentheses if asked)."""
    return " | ".join(f"{n} ({e.description})" if described else n for n, e in MODELS.items())


def split_target(name: str) -> tuple[str, str]:
    """'where:function' -> (where, function), checking both parts are there."""
    where, _, attr = name.rpartition(":")
    if not where or not attr or not attr.isidentifier():
        raise ConfigError(f"model.name: {name!r} is not 'package.module:factory' or 'path/to/file.py:factory'")
    return where, attr


def is_file_path(where: str) -> bool:
    """The 'where' of an import path names a file (``dir/net.py``), not a module (``package.module``)."""
    return where.endswith(".py") or "/" in where or os.sep in where


def absolute_target(name: str) -> str:
    """A file path made absolute (relative to the current folder), so that every process and a later --resume
    from another folder find the same file; a module path unchanged."""
    where, attr = split_target(name)
    if is_file_path(where):
        return f"{os.path.abspath(os.path.expanduser(where))}:{attr}"
    return name
