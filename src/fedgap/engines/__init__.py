"""Engines: how client updates run (``engine.name``), never what they compute.

The name table (``fedgap.engines.names``) is torch-free; the engine classes and the base interface are
imported on first use, so reading the names (config validation) imports no engine, torch or data.
"""

from __future__ import annotations

import importlib

from fedgap.engines.names import ENGINES

_LAZY = {"ClientFailure": "fedgap.engines.results", "RoundOutput": "fedgap.engines.results",
         "Engine": "fedgap.engines.base"}


def engine_class(name: str):
    """The engine class registered as ``name`` (``ENGINES``)."""
    from fedgap.errors import ConfigError

    if name not in ENGINES:
        raise ConfigError(f"engine.name: must be one of {', '.join(ENGINES)}, got {name!r}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedgap.engines' has no attribute {name!r}")


__all__ = ["ENGINES", "ClientFailure", "Engine", "RoundOutput", "engine_class"]
