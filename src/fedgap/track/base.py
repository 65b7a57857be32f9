"""What every tracker shares: the loop callbacks turned into start / log(step, metrics) / finish, the
metric names, and the flattened config.

The loop sets a row's ``seconds`` (wall time of the whole round, callbacks included) after its callbacks
ran, so a round's ``seconds`` is logged one callback later (at the next round, or at the end of the run);
every other column is logged as the round ends. A resumed run starts logging from the checkpoint's round:
the tracker re-logs that round's complete row (every earlier row too when the run was not tracked before) and
subclasses drop what their store already holds, so no step appears twice.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from fedgap.callbacks import RoundCallback
from fedgap.config import config_to_dict

TRACK_FILE = "track.json"  # in the run folder: which tracked run a resumed run continues


def flat_config(cfg) -> dict[str, Any]:
    """The resolved config as dotted keys with scalar values (lists and None as text)."""
    out: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif value is None or isinstance(value, (list, tuple)):
                out[f"{prefix}{key}"] = str(value)
            else:
                out[f"{prefix}{key}"] = value

    walk(config_to_dict(cfg), "")
    return out


def metric_name(column: str) -> str:
    """A metrics-row column as a name every store accepts: ``bn_divergence[block1.bn]`` ->
    ``bn_divergence/block1.bn`` (MLflow allows letters, digits, ``_ - . / `` and spaces)."""
    name = column.replace("[", "/").replace("]", "")
    return re.sub(r"[^\w\-./ ]", "_", name)


def row_metrics(row: dict[str, Any], *, seconds: bool) -> dict[str, float]:
    """The numeric, finite columns of a metrics row (booleans and the round number left out)."""
    out = {}
    for key, value in row.items():
        if key == "round" or (key == "seconds" and not seconds):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        out[metric_name(key)] = float(value)
    return out


def read_track_file(out: Path | None) -> dict[str, Any]:
    if out is None or not (out / TRACK_FILE).exists():
        return {}
    try:
        return json.loads((out / TRACK_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_track_file(out: Path | None, key: str, value: dict[str, Any]) -> None:
    if out is None:
        return
    from fedgap import files

    data = read_track_file(out)
    data[key] = value
    files.write_json(out / TRACK_FILE, data)


class Tracker(RoundCallback):
    """A round callback that logs a run; subclasses implement ``start``, ``log`` and ``finish``."""

    def __init__(self, cfg, out: Path | None, label: str):
        self.cfg, self.out, self.label = cfg, out, label
        self.started = False
        self.start_round = 0

    # ---- what subclasses implement
    def start(self, experiment, resumed: bool) -> bool:
        """Open (or reopen, for a resumed run) the tracked run; return True if it holds nothing yet (a resumed
        run tracked for the first time then logs its earlier rounds too)."""
        return True

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Log metrics at a step (the round)."""

    def finish(self, experiment, summary: dict[str, Any] | None) -> None:
        """Close the tracked run; ``summary`` is None when the run ended without finishing."""

    # ---- the loop's callbacks
    def _begin(self, experiment, start_round: int) -> None:
        self.start_round = start_round
        empty = self.start(experiment, resumed=start_round > 0)
        self.started = True
        if start_round > 0 and experiment.rows:
            for row in experiment.rows if empty else experiment.rows[-1:]:
                self.log(int(row["round"]), row_metrics(row, seconds=True))

    def on_round_end(self, info) -> dict[str, Any]:
        exp = info.run
        if not self.started:
            self._begin(exp, info.round - 1)
        self.log(info.round, row_metrics(info.row, seconds=False))
        if info.round - 1 > self.start_round and exp.rows:
            self.log(info.round - 1, row_metrics({"seconds": exp.rows[-1].get("seconds")}, seconds=True))
        return {}

    def on_run_end(self, experiment, summary: dict[str, Any] | None) -> None:
        if not self.started:
            if summary is None:
                return
            self._begin(experiment, int(experiment.rows[-1]["round"]) if experiment.rows else 0)
        last = experiment.rows[-1] if experiment.rows else None
        if last is not None and last["round"] > self.start_round:
            self.log(last["round"], row_metrics({"seconds": last.get("seconds")}, seconds=True))
        self.finish(experiment, summary)
