"""Tracking for commands that run many experiments (the doctor, sweeps): one MLflow parent run holding the
command's own outputs, with every experiment of the command logged as its own child run.

The experiments execute in pool worker processes, each creating its trackers itself (``Experiment.__init__``);
they learn the parent from ``FEDGAP_MLFLOW_PARENT_RUN``, set here for the duration of the command and
inherited by the workers the pool spawns. A run reused from the cache that was never tracked in this store is
logged from its files (``track_cached``), so every variant appears whatever was cached. The parent's id is kept
in the command's ``--out`` folder (``track.json``): the same doctor or sweep folder, run again, logs to the
same parent run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedgap.track.base import flat_config, metric_name, read_track_file, write_track_file


class CommandRun:
    """The parent run of a doctor or sweep (a no-op when ``track.mlflow`` is off)."""

    def __init__(self, cfg, out: Path, name: str, params: dict[str, Any] | None = None):
        self.cfg, self.out, self.name = cfg, out, name
        self.params = flat_config(cfg) if params is None else params
        self.client = self.run_id = None
        self._saved_env: str | None = None

    def __enter__(self) -> CommandRun:
        if not self.cfg.track.mlflow:
            return self
        from fedgap.track.mlflow import KEY, PARENT_ENV, log_params, open_store, reopen

        self.client, uri, exp_id = open_store(self.cfg.track)
        self.run_id = reopen(self.client, read_track_file(self.out).get(KEY, {}), uri)
        if self.run_id is None:
            tags = {"fedgap.command": self.name, "fedgap.out": str(self.out.resolve())}
            self.run_id = self.client.create_run(exp_id, run_name=self.name, tags=tags).info.run_id
            write_track_file(self.out, KEY, {"tracking_uri": uri, "experiment_id": exp_id, "run_id": self.run_id})
        log_params(self.client, self.run_id, self.params)
        self._saved_env = os.environ.get(PARENT_ENV)
        os.environ[PARENT_ENV] = self.run_id
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id is None:
            return
        from fedgap.track.mlflow import PARENT_ENV

        if self._saved_env is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = self._saved_env
        if exc_type is not None:
            self.client.set_terminated(self.run_id, status="KILLED" if issubclass(exc_type, KeyboardInterrupt)
                                       else "FAILED")

    def finish(self, files: list[str], metrics: dict[str, float] | None = None) -> None:
        """Log the command's output files (those that exist) and numbers, and close the parent run."""
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        if metrics:
            self.client.log_batch(self.run_id, metrics=[Metric(metric_name(k), float(v), 0, 0)
                                                          for k, v in metrics.items()])
        for name in files:
            if (self.out / name).exists():
                self.client.log_artifact(self.run_id, str(self.out / name))
        self.client.set_terminated(self.run_id, status="FINISHED")


def track_cached(record: Any) -> None:
    """A finished run reused from the pool's cache: log it to MLflow from its files if it was never tracked
    in this store (called by the pool for every cached record; a no-op when ``track.mlflow`` is off)."""
    cfg = record.spec.cfg
    if not cfg.track.mlflow or not record.ok:
        return
    from fedgap.track.mlflow import log_finished_run

    log_finished_run(cfg, record.run_dir, record.spec.name, record.rows, record.summary)


__all__ = ["CommandRun", "track_cached"]
