"""Models: the registry of names (``models.registry``, torch-free) and ``build_model(model_config, image_shape,
num_classes)`` (``models.build``). ``build_model`` is imported on first use, so that the config validator can
read the registry without importing torch."""

from __future__ import annotations

_LAZY = {"build_model", "build_model_reported", "count_parameters"}


def __getattr__(name: str):
    if name in _LAZY:
        from fedgap.models import build

        return getattr(build, name)
    raise AttributeError(f"module 'fedgap.models' has no attribute {name!r}")
