"""``fedgap doctor``: run the centralized baseline, the naive federated run and the remedies on identical
partitions and seeds, measure the gap, explain it and rank the remedies.

Two phases. First the centralized baseline, the naive run (with diagnostics) and each remedy alone, all at
once on the pool. Then the best remedy of every cause group that beat the naive run,
combined into one more run. Every run is cached in ``OUT/runs`` by config hash (see ``pool``), so a killed
doctor started again only does what is missing, and a second call with the same settings reruns nothing.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgap import __version__
from fedgap.config import Config, config_to_dict, results_hash
from fedgap.diagnose import variants as V
from fedgap.diagnose.diagnosis import Finding, write_diagnosis
from fedgap.diagnose.gap import GapRow, gap_rows, noise_pp
from fedgap.diagnose.pool import RunRecord, RunSpec, run_all
from fedgap.errors import ConfigError
from fedgap.fl import outputs
from fedgap.track.command import CommandRun

GAP_COLUMNS = ["variant", "final_test_accuracy", "gap_pp", "rounds_to_target", "final_std", "best_test_accuracy",
               "best_std", "gap_equal_samples_pp", "gap_closed", "reached", "seeds", "rounds", "wall_seconds",
               "cause", "label", "changes", "error", "diverged", "last_test_accuracy", "late_sem"]


@dataclass
class DoctorResult:
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

    def row(self, key: str) -> GapRow | None:
        return next((r for r in self.rows if r.variant == key), None)

    def timing(self) -> str:
        """For headers: '13 runs, 0.2 minutes (all reused from the cache, which took 61.2 minutes of runs)'."""
        recs = [rec for group in self.records.values() for rec in group]
        run_minutes = sum((rec.summary or {}).get("wall_seconds") or 0.0 for rec in recs) / 60
        reused = sum(rec.cached for rec in recs)
        text = f"{len(recs)} runs, {self.seconds / 60:.1f} minutes"
        if reused:
            which = "all" if reused == len(recs) else f"{reused}"
            text += f" ({which} reused from the cache, which took {run_minutes:.1f} minutes of runs)"
        return text


def seeded(cfg: Config, i: int) -> Config:
    if i == 0:
        return cfg
    copy = cfg.model_copy(deep=True)
    copy.seed = cfg.seed + i
    return copy


def central_epochs(naive: Config, preset: V.DoctorPreset, train_size: int, sizes: list[int]) -> int:
    """Enough epochs for the preset and for the equal-samples comparison with the naive run (the expected
    samples of its sampled clients, plus 10% for sampling noise)."""
    mean_size = sum(sizes) / len(sizes)
    fed = naive.server.rounds * naive.server.clients_per_round * mean_size * naive.client.epochs
    return max(preset.central_epochs, math.ceil(1.1 * fed / train_size))


def run_doctor(config_path: str | None, overrides: list[str], *, preset: str = "quick", seeds: int = 1,
               out: Path, jobs: int | None = None, target: float | None = None, show_progress: bool = True,
               command: str = "fedgap doctor") -> DoctorResult:
    t0 = time.perf_counter()
    p = V.PRESETS[preset]
    tree = V.base_tree(p, config_path, overrides)
    naive = V.config_from_dict(tree)
    if naive.data.partition == "central":
        raise ConfigError("data.partition: the doctor compares federated with centralized training; give a "
                          "federated partition (iid | dirichlet | shards | quantity), not central")
    outputs.prepare_dir(out)
    lock = outputs.RunLock(out)  # one doctor per folder; its runs have their own locks
    try:
        with CommandRun(naive, out, "doctor") as tracking:  # track.mlflow: the parent run of the variants' runs
            result = _diagnose(naive, tree, p, seeds, out, jobs, target, show_progress, command, t0)
        tracking.finish(["report.html", "gap.csv", "gap.md", "summary.json"],
                        {f"{k}/{r.variant}": getattr(r, k) for r in result.rows
                         for k in ("final_test_accuracy", "gap_pp") if getattr(r, k) is not None})
        return result
    finally:
        lock.release()


def _diagnose(naive: Config, tree: dict, p: V.DoctorPreset, seeds: int, out: Path, jobs: int | None,
              target: float | None, show_progress: bool, command: str, t0: float) -> DoctorResult:
    from fedgap.data.datasets import load_dataset
    from fedgap.data.partition import partition_for, partition_stats

    preset = p.name
    d = naive.data
    data = load_dataset(d.name, d.root)
    labels = data.train_y.numpy()
    parts = partition_for(d, labels, naive.seed)
    stats = partition_stats(parts, labels, data.num_classes)

    singles, skipped = V.single_variants(naive, tree, p)
    epochs = central_epochs(naive, p, len(labels), [len(x) for x in parts])
    central = V.Variant("central", "centralized", "", V.central_config(naive, epochs))
    naive_v = V.Variant("naive", "naive", "", naive)
    phase1 = [central, naive_v, *singles]
    records = _run(phase1, seeds, out, jobs, show_progress, f"doctor ({preset}): runs")

    rows = gap_rows(phase1, records, "central", "naive", target or 0.0)
    winners = _winners(rows, singles)
    combo = V.combination(tree, winners)
    variants = list(phase1)
    notes = []
    if combo is not None:
        known = {results_hash(v.cfg): v for v in phase1}
        if results_hash(combo.cfg) in known:
            notes.append(f"the best combination equals {known[results_hash(combo.cfg)].label}; not rerun")
        else:
            variants.append(combo)
            records.update(_run([combo], seeds, out, jobs, show_progress, f"doctor ({preset}): combination"))
    elif singles:
        notes.append("fewer than two cause groups had a remedy that beat the naive run; no combination was run")

    naive_row = next(r for r in rows if r.variant == "naive")
    if target is None:
        target_source = "the naive run's final accuracy"
        target = math.floor(1000 * (naive_row.final_test_accuracy or 0)) / 1000
    else:
        target_source = "given with --target"
    rows = gap_rows(variants, records, "central", "naive", target)
    findings = write_diagnosis(rows, records["naive"], records["central"], stats.summary(), noise_pp(rows),
                               seeds, target, target_source)
    cut = p.cut(naive, epochs, seeds)
    result = DoctorResult(out, p, variants, records, rows, target, target_source, findings, cut, skipped,
                          stats.summary(), stats.counts, time.perf_counter() - t0, command, notes)
    write_outputs(result)
    return result


def _run(variants: list[V.Variant], seeds: int, out: Path, jobs: int | None, show_progress: bool,
         title: str) -> dict[str, list[RunRecord]]:
    specs, owners = [], []
    for v in variants:
        for i in range(seeds):
            specs.append(RunSpec(f"{v.key}-s{i}", seeded(v.cfg, i), diagnostics=v.key == "naive"))
            owners.append(v.key)
    got = run_all(specs, out, jobs=jobs, title=title, show_progress=show_progress)
    records: dict[str, list[RunRecord]] = {v.key: [] for v in variants}
    for key, rec in zip(owners, got, strict=True):
        records[key].append(rec)
    return records


COMBINE_GROUPS = 2


def _winners(rows: list[GapRow], singles: list[V.Variant]) -> list[V.Variant]:
    """The best single remedy of each of the (at most) two cause groups that gained most over the naive run;
    best first.

    Any gain counts, even one within the noise: the combination is itself a measurement, run to see whether
    small gains of different causes add up (a 150-round run measured SCAFFOLD +0.64 pp and BN recalibration
    +0.17 pp). Two groups, not all that gained: at alpha 0.1 joining every group's winner (FedBN + FedYogi +
    AdamW + FedProx) scored 77.0% against FedBN's 94.6% alone, each extra change being one more interaction
    nobody tuned. Whether a remedy, or the combination, really helped is judged in the diagnosis."""
    naive = next(r for r in rows if r.variant == "naive")
    if naive.final_test_accuracy is None:
        return []
    by_key = {v.key: v for v in singles}
    best: dict[str, GapRow] = {}
    for r in rows:
        if r.variant in by_key and r.final_test_accuracy is not None and \
                r.final_test_accuracy > naive.final_test_accuracy:
            if r.cause not in best or r.final_test_accuracy > best[r.cause].final_test_accuracy:
                best[r.cause] = r
    ranked = sorted(best.values(), key=lambda r: -r.final_test_accuracy)
    return [by_key[r.variant] for r in ranked[:COMBINE_GROUPS]]


# ------------------------------------------------------------------------------------------------- outputs
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
        "variants": [r.as_dict() for r in res.rows],
        "diagnosis": [f.as_dict() for f in res.findings],
        "skipped": res.skipped,
        "notes": res.notes,
        "curves": {v.key: [[rec.run_dir.name, [[r["round"], r.get("test_accuracy"), r["samples"]]
                                               for r in rec.rows]] for rec in res.records[v.key] if rec.ok]
                   for v in res.variants},
        "naive_diagnostics": {k: [r.get(k) for r in naive.rows] for k in series_keys},
        "runs": {v.key: [str(rec.run_dir.relative_to(res.out)) for rec in res.records[v.key]] for v in res.variants},
    }


def write_outputs(res: DoctorResult) -> None:
    from fedgap.report.html import write_report
    from fedgap.report.markdown import render_markdown

    outputs.atomic_write_text(res.out / "gap.csv", gap_csv(res.rows))
    outputs.atomic_write_text(res.out / "gap.md", render_markdown(res))
    summary = summary_dict(res)
    outputs.write_json(res.out / "summary.json", summary)
    write_report(res, res.out / "report.html")
