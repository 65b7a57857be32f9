"""Experiment tracking: TensorBoard and MLflow as round callbacks of the loop (``track.*``, off by default).

A tracker is created inside the process that runs the experiment (the loop attaches them in
``Experiment.__init__``), so runs of the doctor and of sweeps executing in pool workers each log their own
run. Trackers never change a number: ``track.*`` is in ``RESULT_NEUTRAL``, so cached runs still hit.

Lifecycle (``fedgap.track.base.Tracker``): nothing happens until the first round ends (a finished run that is
only reloaded logs nothing); ``on_round_end`` logs the round; ``on_run_end`` logs the run's files and closes.
"""

from __future__ import annotations

from typing import Any

from fedgap.errors import ConfigError


def require(module: str, extra: str, key: str) -> Any:
    """Import an optional tracking package or fail with one line naming the key and the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{key}: needs the {extra.split('[')[0]} package; pip install 'fedgap[{extra}]'") from None


def make_trackers(cfg, out, label: str) -> list:
    """The trackers ``cfg.track`` asks for (an empty list when tracking is off)."""
    trackers: list = []
    if cfg.track.tensorboard:
        from fedgap.track.tensorboard import TensorBoardTracker

        trackers.append(TensorBoardTracker(cfg, out, label))
    if cfg.track.mlflow:
        from fedgap.track.mlflow import MlflowTracker

        trackers.append(MlflowTracker(cfg, out, label))
    return trackers


__all__ = ["make_trackers", "require"]
