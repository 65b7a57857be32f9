"""``track.mlflow=URI``: one MLflow run per experiment, in experiment ``track.experiment``.

- params: the resolved config as dotted keys (``server.lr``, ``data.alpha``, ...);
- metrics: every numeric metrics-row column per round (step = round), then the summary's numbers;
- artifacts: config.yaml, metrics.csv and summary.json of the run folder;
- tags: ``fedgap.run_dir``, ``fedgap.results_hash`` and, for a run of the doctor or a sweep, the parent run.

The store: ``true`` is ``sqlite:///mlflow.db`` in the current folder with artifacts in ``mlartifacts`` beside
it (what ``mlflow ui`` started in that folder shows; MLflow 3 keeps its ``file:`` store in maintenance mode
and refuses it unless asked, so a ``file:`` URI given here is allowed explicitly). Any other URI goes to
MLflow as it is.

Resume: the run id is kept in the run folder's ``track.json``; a resumed run reopens that MLflow run and logs
a (metric, step) only if the run does not hold that step yet, so a kill at any moment leaves no duplicate
step. The MLflow client API is used directly (never the global active run), so several runs can be logged
one after another in one process (the pool's one-job mode).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from fedgap.config import results_hash
from fedgap.errors import ConfigError
from fedgap.track import require
from fedgap.track.base import Tracker, flat_config, read_track_file, row_metrics, write_track_file

PARENT_ENV = "FEDGAP_MLFLOW_PARENT_RUN"  # set by the doctor and sweeps; inherited by their pool workers
KEY = "mlflow"


def resolve_uri(value: bool | str) -> str:
    if value is True or str(value).lower() == "true":
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    uri = str(value)
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # asked for by name: allowed (see above)
    return uri


def artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store go to ``mlartifacts`` beside the database (as ``mlflow server`` does)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def open_store(track) -> tuple[Any, str, str]:
    """(MlflowClient, resolved URI, experiment id) for the ``track`` section, the experiment created on first
    use; a one-line ConfigError without the package or when the store cannot be opened. Creating a new SQLite
    store takes MLflow a few seconds (its schema migrations): done here, before the first round is timed."""
    require("mlflow", "mlflow", "track.mlflow")
    from mlflow.tracking import MlflowClient

    uri = resolve_uri(track.mlflow)
    try:
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri)
        return client, uri, experiment_id(client, track.experiment, uri)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        first = first if len(first) <= 160 else first[:157] + "..."
        raise ConfigError(f"track.mlflow: cannot open the MLflow store {uri!r} ({first})") from None


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created on first use (two processes creating it at once: one wins)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(uri))
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def reopen(client, stored: dict[str, Any], uri: str) -> str | None:
    """The stored run id if it lives in this store and still exists, else None."""
    if not holds_run(client, stored, uri):
        return None
    client.update_run(stored["run_id"], status="RUNNING")
    return stored["run_id"]


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    """Log params not yet on the run (MLflow params are immutable; a resumed run may have extended
    server.rounds, which then stays as first logged)."""
    from mlflow.entities import Param

    have = client.get_run(run_id).data.params
    todo = [Param(k, str(v)) for k, v in params.items() if k not in have]
    for i in range(0, len(todo), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=todo[i : i + 100])


class MlflowTracker(Tracker):
    def __init__(self, cfg, out: Path | None, label: str):
        super().__init__(cfg, out, label)
        self.client, self.uri, self.experiment_id = open_store(cfg.track)  # fail before the run starts
        self.run_id: str | None = None
        self.last_step: dict[str, int] = {}

    def start(self, experiment, resumed: bool) -> bool:
        client = self.client
        stored = read_track_file(self.out).get(KEY, {})
        self.run_id = reopen(client, stored, self.uri) if resumed else None
        if self.run_id is not None:
            run = client.get_run(self.run_id)
            self.last_step = {k: max(m.step for m in client.get_metric_history(self.run_id, k))
                              for k in run.data.metrics}
        else:
            exp_id = self.experiment_id
            tags = {"fedgap.results_hash": results_hash(self.cfg)}
            if self.out is not None:
                tags["fedgap.run_dir"] = str(self.out.resolve())
            if os.environ.get(PARENT_ENV):
                tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
            self.run_id = client.create_run(exp_id, run_name=self.label, tags=tags).info.run_id
            write_track_file(self.out, KEY, {"tracking_uri": self.uri, "experiment_id": exp_id,
                                             "run_id": self.run_id})
        log_params(client, self.run_id, flat_config(self.cfg))
        return not self.last_step

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        todo = [Metric(k, v, now, step) for k, v in metrics.items() if step > self.last_step.get(k, -1)]
        if todo:
            self.client.log_batch(self.run_id, metrics=todo)
            for m in todo:
                self.last_step[m.key] = step

    def finish(self, experiment, summary: dict[str, Any] | None) -> None:
        if self.run_id is None:
            return
        if summary is not None:
            step = int(summary.get("rounds_completed") or 0)
            self.log(step, {f"summary.{k}": v for k, v in row_metrics(summary, seconds=True).items()})
            if self.out is not None:
                for name in ("config.yaml", "metrics.csv", "summary.json"):
                    if (self.out / name).exists():
                        self.client.log_artifact(self.run_id, str(self.out / name))
        self.client.set_terminated(self.run_id, status="FINISHED" if summary is not None else "KILLED")


def log_finished_run(cfg, run_dir: Path, name: str, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Log a run that finished untracked (a cached doctor or sweep run) from its files, unless its folder
    already names a run in this store."""
    tracker = MlflowTracker(cfg, run_dir, name)
    if holds_run(tracker.client, read_track_file(run_dir).get(KEY, {}), tracker.uri):
        return
    tracker.start(None, resumed=False)
    for row in rows:
        tracker.log(int(row["round"]), row_metrics(row, seconds=True))
    tracker.finish(None, summary)


def holds_run(client, stored: dict[str, Any], uri: str) -> bool:
    """Whether ``stored`` names an existing run of this store."""
    if not stored or stored.get("tracking_uri") != uri:
        return False
    try:
        client.get_run(stored["run_id"])
    except Exception:
        return False
    return True
