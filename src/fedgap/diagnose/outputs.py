"""The doctor's data files, all written here: ``gap.csv`` (one row per variant), ``recommended.yaml`` (the
winning configuration, runnable as it is) and ``summary.json`` (everything measured and chosen, for tools). The
documents (``report.html``, ``gap.md``) are rendered from the same result by ``fedgap.report``."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from fedgap import __version__
from fedgap.config import config_to_dict, dump_yaml
from fedgap.diagnose.gap import GapRow
from fedgap.diagnose.result import DoctorResult
from fedgap.errors import FedgapError
from fedgap.experiment import outputs
from fedgap.runs.cache import RUNS
from fedgap.track.base import TRACK_FILE

GAP_COLUMNS = ["variant", "final_test_accuracy", "gap_pp", "rounds_to_target", "final_val_accuracy", "chosen",
               "searched", "final_std", "best_test_accuracy", "best_std", "gap_equal_samples_pp", "gap_closed",
               "reached", "seeds", "rounds", "wall_seconds", "cause", "label", "changes", "error", "diverged",
               "last_test_accuracy", "late_sem"]
RECOMMENDED = "recommended.yaml"
SUMMARY = "summary.json"
# What a doctor writes in --out: its files, the run cache, its lock, the tracked run's id; and the temporary
# files of an atomic write or a writability probe that a kill can leave behind.
DOCTOR_ENTRIES = frozenset({"report.html", "gap.csv", "gap.md", SUMMARY, RECOMMENDED, RUNS, outputs.LOCK, TRACK_FILE})
LEFTOVER = re.compile(r"^\..+\.tmp-\d+(\.\w+)?$|^\.write-probe-\d+$")


def foreign_files(out: Path) -> list[str]:
    """What ``out`` holds that a doctor did not write (a run's files, the user's own), in name order; a
    ``summary.json`` counts when it is not a doctor's (a finished ``fedgap run`` left it)."""
    if not out.is_dir():
        return []
    foreign = [p.name for p in sorted(out.iterdir()) if p.name not in DOCTOR_ENTRIES and not LEFTOVER.match(p.name)]
    summary = out / SUMMARY
    if summary.is_file() and not _is_doctor_summary(summary):
        foreign.insert(0, f"{SUMMARY} (a run's)")
    return foreign


def _is_doctor_summary(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "preset" in data and "variants" in data


def check_out(out: Path, overwrite: bool) -> None:
    """A doctor writes only into a new or empty folder or a doctor's own (to resume or repeat it): anything else
    is refused in one line before any work, unless ``--overwrite`` says to write beside it (files named like the
    doctor's are then replaced, others kept)."""
    if out.exists() and not out.is_dir():
        raise FedgapError(f"--out '{out}': exists and is not a folder")
    foreign = foreign_files(out)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise FedgapError(f"--out '{out}': holds files a doctor did not write ({shown}); choose a new folder, or pass "
                          f"--overwrite to write the doctor's files beside them")


def gap_csv(rows: list[GapRow]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=GAP_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        d = r.as_dict()
        writer.writerow({k: ("" if d.get(k) is None else (f"{d[k]:.6g}" if isinstance(d[k], float) else d[k]))
                         for k in GAP_COLUMNS})
    return buf.getvalue()


def summary_dict(res: DoctorResult) -> dict[str, Any]:
    naive = res.records["naive"][0]
    series_keys = [k for k in (naive.rows[0] if naive.rows else {}) if k not in ("seconds", "train_seconds")]
    return {
        "fedgap_version": __version__,
        "command": res.command,
        "preset": res.preset.name,
        "preset_cut": res.cut,
        "seconds": res.seconds,
        "target_accuracy": res.target,
        "target_source": res.target_source,
        "naive_config": config_to_dict(res.records["naive"][0].spec.cfg),
        "partition": res.partition,
        "model": res.facts.as_dict() if res.facts is not None else None,
        "selection": "validation accuracy (mean of the last 3 evaluations on data.validation); test never used",
        "recommended": None if res.recommended is None else {
            "variant": res.recommended.key, "label": res.recommended.label,
            "changes": list(res.recommended.overrides), "file": RECOMMENDED},
        "tuning": {key: {"searched": t.searched(), "chosen": list(t.best.point), "rounds_trained": t.rounds_trained,
                         "trials": [{"point": list(tr.point), "validation_scores": {str(k): v for k, v in
                                                                                    tr.scores.items()}}
                                    for tr in t.trials]}
                   for key, t in res.tuning.items()},
        "budget": res.budget,
        "variants": [r.as_dict() for r in res.rows],
        "diagnosis": [f.as_dict() for f in res.findings],
        "skipped": res.skipped,
        "notes": res.notes,
        "curves": {v.key: [[rec.run_dir.name, [[r["round"], r.get("test_accuracy"), r["samples"],
                                                r.get("val_accuracy")] for r in rec.rows]]
                           for rec in res.records[v.key] if rec.ok]
                   for v in res.variants},
        "naive_diagnostics": {k: [r.get(k) for r in naive.rows] for k in series_keys},
        "runs": {v.key: [str(rec.run_dir.relative_to(res.out)) for rec in res.records[v.key]] for v in res.variants},
    }


def recommended_yaml(res: DoctorResult) -> str | None:
    """The recommended configuration as a file ``fedgap run recommended.yaml`` runs as it is (fully resolved, so
    it reproduces the doctor's run of it), with what it changes against the user's setting on top."""
    v = res.recommended
    if v is None:
        return None
    row = res.row(v.key)
    lines = [f"# fedgap doctor ({res.preset.name}) recommends: {v.label}",
             "# chosen on validation accuracy (data.validation), never on the test set",
             f"# changes against your setting: {' '.join(v.overrides) or 'none (your setting is the best found)'}"]
    if row is not None and row.final_test_accuracy is not None:
        lines.append(f"# measured here: validation {100 * (row.final_val_accuracy or 0):.2f}%, test "
                     f"{100 * row.final_test_accuracy:.2f}% (means of the last 3 evaluations), "
                     f"{row.rounds} rounds")
    lines.append(f"# run it: fedgap run {RECOMMENDED} --out runs/recommended")
    return "\n".join(lines) + "\n" + dump_yaml(v.cfg)


def write_outputs(res: DoctorResult) -> None:
    """The data files: gap.csv, recommended.yaml, summary.json (the documents, report.html and gap.md, are
    rendered by ``fedgap.report.write_doctor_report``)."""
    outputs.atomic_write_text(res.out / "gap.csv", gap_csv(res.rows))
    recommended = recommended_yaml(res)
    if recommended is not None:
        outputs.atomic_write_text(res.out / RECOMMENDED, recommended)
    outputs.write_json(res.out / SUMMARY, summary_dict(res))
