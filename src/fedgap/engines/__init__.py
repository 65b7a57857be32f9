"""Engine registry. Engines are imported lazily: the Ray engine needs the optional ``ray`` extra."""

from __future__ import annotations

import importlib

from fedgap.engines.base import ClientFailure, Engine, RoundOutput

ENGINES = {
    "sequential": "fedgap.engines.sequential:SequentialEngine",
    "vectorized": "fedgap.engines.vectorized:VectorizedEngine",
    "parallel": "fedgap.engines.parallel:ParallelEngine",
    "ray": "fedgap.engines.ray_engine:RayEngine",
}


def engine_class(name: str) -> type[Engine]:
    from fedgap.errors import ConfigError

    if name not in ENGINES:
        raise ConfigError(f"engine.name: must be one of {', '.join(ENGINES)}, got {name!r}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["ENGINES", "ClientFailure", "Engine", "RoundOutput", "engine_class"]
