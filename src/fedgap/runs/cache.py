"""The run cache: each run lives in ``ROOT/runs/<name>-<results hash>/`` with its usual files. A run whose
``summary.json`` exists is reused, not rerun; a run with a checkpoint is resumed; a longer run of the same config
starts from a shorter finished one (successive halving extends runs instead of repeating them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fedgap.config import RESULT_NEUTRAL, Config, config_from_dict, config_hash, read_yaml
from fedgap.errors import FedgapError
from fedgap.experiment import outputs
from fedgap.runs.records import RunSpec

RUNS = "runs"


def run_dir_for(root: Path, spec: RunSpec) -> Path:
    """The folder of a run: an existing one with the same hash is reused whatever its name."""
    base = root / RUNS
    found = sorted(base.glob(f"*-{spec.key}")) if base.exists() else []
    return found[0] if found else base / f"{spec.name}-{spec.key}"


def extension_key(cfg: Config) -> str | None:
    """What a run shares with the same run cut at fewer rounds (all but server.rounds and eval.every); None when
    a shorter run is not a prefix of a longer one (a cosine server lr schedule depends on server.rounds)."""
    if cfg.server.lr_schedule != "constant":
        return None
    return config_hash(cfg, RESULT_NEUTRAL + (("server", "rounds"), ("eval", "every")))[:12]


def finished_prefixes(root: Path) -> list[tuple[str, int, Path]]:
    """(extension key, rounds completed, folder) of every finished, non-diverged run under ``root``: read once
    per ``run_all`` call, not once per spec."""
    base = root / RUNS
    out = []
    for other in base.iterdir() if base.exists() else ():
        ckpt, cfg_file, summary_file = other / outputs.CHECKPOINT, other / outputs.CONFIG, other / outputs.SUMMARY
        if not (ckpt.exists() and cfg_file.exists() and summary_file.exists()):
            continue
        try:
            key = extension_key(config_from_dict(read_yaml(cfg_file)))
        except FedgapError:
            continue
        summary = json.loads(summary_file.read_text())
        if key is not None and not summary.get("diverged_at_round"):
            out.append((key, int(summary.get("rounds_completed") or 0), other))
    return out


def start_from_shorter(prefixes: list[tuple[str, int, Path]], spec: RunSpec, run_dir: Path) -> int:
    """Successive halving extends runs instead of repeating them: if a run of the same config with fewer
    rounds exists (``prefixes``), copy its checkpoint and metrics into ``run_dir`` so the run resumes from there
    (a resumed run ends exactly as an uninterrupted one, tests/test_run.py). Returns the rounds it starts from."""
    key = extension_key(spec.cfg)
    if key is None or run_dir.exists():
        return 0
    shorter = [(done, other) for k, done, other in prefixes if k == key and 0 < done < spec.cfg.server.rounds]
    if not shorter:
        return 0
    best_rounds, best = max(shorter, key=lambda item: item[0])
    run_dir.mkdir(parents=True)
    for name in (outputs.CONFIG, outputs.METRICS, outputs.CHECKPOINT):
        shutil.copy2(best / name, run_dir / name)
    return best_rounds
