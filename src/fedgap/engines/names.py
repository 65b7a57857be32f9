"""The engine name table, torch-free: what ``engine.name`` accepts (config validation and ``fedgap keys`` read it
without importing torch, data or any engine). Adding an engine is one line here and its module."""

from __future__ import annotations

ENGINES = {
    "sequential": "fedgap.engines.sequential:SequentialEngine",
    "vectorized": "fedgap.engines.vectorized:VectorizedEngine",
    "parallel": "fedgap.engines.parallel:ParallelEngine",
    "ray": "fedgap.engines.ray_engine:RayEngine",  # needs the optional ``ray`` extra
}
