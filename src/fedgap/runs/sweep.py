"""``fedgap sweep``: the grid of every combination of comma-separated override values, run on the pool with
the doctor's caching (``OUT/runs``), then a comparison table (terminal and ``sweep.csv``), accuracy curves
(``sweep.png``) and ``summary.json``.

    fedgap sweep model.norm=batch,group server.algorithm=fedavg,fedadam server.rounds=30 --out runs/sweep

Commas inside brackets belong to one value (``engine.fail_clients=[1,2]``).
"""

from __future__ import annotations

import csv
import io
import itertools
import re
from collections.abc import Callable
from pathlib import Path

from fedgap.config import load_config
from fedgap.errors import ConfigError
from fedgap.experiment import outputs
from fedgap.preflight import check_inputs
from fedgap.runs.pool import run_all
from fedgap.runs.records import RunSpec
from fedgap.runs.scores import first_round_at, late_accuracy
from fedgap.track.base import flat_config
from fedgap.track.command import CommandRun

COLUMNS = ["final_test_accuracy", "best_test_accuracy", "rounds_to_target", "seconds_per_round", "wall_seconds",
           "diverged_at_round"]


def split_values(raw: str) -> list[str]:
    """'a,b,[1,2]' -> ['a', 'b', '[1,2]']: commas at bracket depth 0 separate values."""
    values, depth, current = [], 0, ""
    for ch in raw:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    return [v.strip() for v in values]


def grid(overrides: list[str]) -> tuple[list[str], list[list[str]]]:
    """(swept keys, one override list per grid point); fixed overrides come first in every point."""
    fixed, axes = [], []
    for item in overrides:
        key, raw = item.split("=", 1)
        values = split_values(raw)
        if len(values) == 1:
            fixed.append(item)
        else:
            if any(v == "" for v in values):
                raise ConfigError(f"sweep '{item}': empty value in the list")
            axes.append([f"{key}={v}" for v in values])
    points = [fixed + list(combo) for combo in itertools.product(*axes)] if axes else [fixed]
    return [a[0].split("=", 1)[0] for a in axes], points


def slug(items: list[str]) -> str:
    text = "_".join(i.split("=", 1)[1] for i in items) or "base"
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60] or "point"


def ranked_by_validation(rows: list[dict]) -> bool:
    """With a validation split (data.validation) the grid is ranked by it, as the doctor chooses: whoever picks
    the top row then picks on validation, never on test; without one, by the final test accuracy."""
    return any(r["late_val_accuracy"] is not None for r in rows)


def run_sweep(path: str | None, overrides: list[str], out: Path, *, jobs: int | None = None,
              threads: int | None = None, show_progress: bool = True, command: str = "fedgap sweep",
              render: Callable[[Path, list], None] | None = None) -> tuple[list[str], list[dict], list]:
    """Run the grid (every point validated before anything runs), write sweep.csv and summary.json, and return
    (swept keys, one row per run, best final accuracy first, [(spec, record)]). ``render(out, runs)`` draws
    the plots before a tracked sweep logs its files."""
    keys, points = grid(overrides)
    specs = []
    for point in points:
        cfg = load_config(path, point)
        swept = [p for p in point if p.split("=", 1)[0] in keys]
        specs.append(RunSpec(slug(swept), cfg))
    checked: set[str] = set()
    for spec in specs:  # every distinct data set and model loads and builds before --out is touched
        key = repr((spec.cfg.data, spec.cfg.model, spec.cfg.seed))
        if key not in checked:
            checked.add(key)
            check_inputs(spec.cfg)
    outputs.prepare_dir(out)
    common = {k: v for k, v in flat_config(specs[0].cfg).items() if k not in keys}  # the parent run's params
    with CommandRun(specs[0].cfg, out, "sweep", {**common, "sweep.keys": ",".join(keys)}) as tracking:
        records = run_all(specs, out, jobs=jobs, threads=threads, title="sweep", show_progress=show_progress)
    rows = []
    for spec, point, rec in zip(specs, points, records, strict=True):
        values = {p.split("=", 1)[0]: p.split("=", 1)[1] for p in point}
        s = rec.summary or {}
        row = {k: values[k] for k in keys}
        row.update({c: s.get(c) for c in COLUMNS})
        row["late_test_accuracy"] = late_accuracy(rec)[0] if rec.ok else None  # as the doctor's final accuracy
        row["late_val_accuracy"] = late_accuracy(rec, "val_accuracy")[0] if rec.ok else None
        row["rounds_to_target"] = first_round_at(rec, spec.cfg.eval.target) if rec.ok else None
        row["run_dir"] = str(rec.run_dir.relative_to(out))
        row["error"] = rec.error
        rows.append(row)
    rank_by = "late_val_accuracy" if ranked_by_validation(rows) else "final_test_accuracy"
    rows.sort(key=lambda r: -(r[rank_by] if r[rank_by] is not None else -1))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*keys, *COLUMNS, "late_test_accuracy", "late_val_accuracy", "run_dir",
                                                  "error"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    outputs.atomic_write_text(out / "sweep.csv", buf.getvalue())
    outputs.write_json(out / "summary.json", {"keys": keys, "points": rows, "command": command})
    runs = list(zip(specs, records, strict=True))
    if render is not None:
        render(out, runs)
    tracking.finish(["sweep.csv", "sweep.png", "summary.json"])
    return keys, rows, runs
