"""A run as the run executor sees it: what to run (``RunSpec``: a name and a config) and what came of it
(``RunRecord``: its folder, summary and metrics rows, read back from the run's own files)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgap.config import Config, results_hash
from fedgap.experiment import outputs


@dataclass
class RunSpec:
    name: str  # short, file-name safe: "fedprox-s0"
    cfg: Config
    diagnostics: bool = False

    @property
    def key(self) -> str:
        return results_hash(self.cfg)


@dataclass
class RunRecord:
    spec: RunSpec
    run_dir: Path
    summary: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    cached: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.summary is not None


def load_record(spec: RunSpec, run_dir: Path) -> RunRecord | None:
    """The finished run in run_dir, or None."""
    summary_path = run_dir / outputs.SUMMARY
    if not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    rows = [_parse_row(r) for r in outputs.read_metrics(run_dir / outputs.METRICS)]
    return RunRecord(spec, run_dir, summary, rows, cached=True)


def _parse_row(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if v == "":
            out[k] = None
            continue
        try:
            out[k] = int(v) if v.lstrip("-").isdigit() else float(v)
        except ValueError:
            out[k] = v
    return out


# ------------------------------------------------------------------------------------------------- workers
