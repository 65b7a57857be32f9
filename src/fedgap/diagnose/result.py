"""The doctor's result: the variants, their runs, the gap table, the diagnosis and the recommendation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgap.diagnose import variants as V
from fedgap.diagnose.diagnosis import Finding
from fedgap.diagnose.facts import ModelFacts
from fedgap.diagnose.gap import GapRow
from fedgap.diagnose.tuning import TuneResult
from fedgap.runs.records import RunRecord


@dataclass(kw_only=True)
class DoctorResult:
    """Everything one doctor run measured and chose: what its outputs and reports are written from."""

    out: Path
    preset: V.DoctorPreset
    variants: list[V.Variant]
    records: dict[str, list[RunRecord]]
    rows: list[GapRow]
    target: float
    target_source: str
    findings: list[Finding]
    cut: str
    skipped: list[str]
    partition: dict[str, Any]
    heatmap_counts: Any
    seconds: float
    command: str
    notes: list[str] = field(default_factory=list)
    recommended: V.Variant | None = None
    tuning: dict[str, TuneResult] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    facts: ModelFacts | None = None  # the naive model's BatchNorm settings

    def row(self, key: str) -> GapRow | None:
        return next((r for r in self.rows if r.variant == key), None)

    def timing(self) -> str:
        """For headers: '13 runs, 0.2 minutes (all reused from the cache, which took 61.2 minutes of runs)'."""
        unique: dict[Path, RunRecord] = {}  # one run folder can serve several variants (a grid point = naive)
        for rec in [rec for group in self.records.values() for rec in group] + \
                [t.record for res in self.tuning.values() for t in res.trials if t.record is not None]:
            unique.setdefault(rec.run_dir, rec)
        recs = list(unique.values())
        run_minutes = sum((rec.summary or {}).get("wall_seconds") or 0.0 for rec in recs) / 60
        reused = sum(rec.cached for rec in recs)
        text = f"{len(recs)} runs, {self.seconds / 60:.1f} minutes"
        if reused:
            which = "all" if reused == len(recs) else f"{reused}"
            text += f" ({which} reused from the cache, which took {run_minutes:.1f} minutes of runs)"
        return text
