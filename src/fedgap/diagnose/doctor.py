"""``fedgap doctor``: run the centralized baseline and the naive run, tune every remedy on a validation split,
search the combination, measure the gap, explain it, and write the winner as ``recommended.yaml``.

Phases, each on the pool (runs cached in ``OUT/runs`` by config hash, so a killed doctor started again only
does what is missing and a second call with the same settings reruns nothing):

1. the centralized baseline and the naive run (the user's setting as given, with diagnostics);
2. every remedy and a tuned-FedAvg row at their own best hyper-parameters, by successive halving on the
   validation accuracy (``fedgap.diagnose.tuning``);
3. greedy forward selection: starting from the best tuned variant, add the best-tuned remedy of another cause
   while that raises validation accuracy;
4. the variant with the highest validation accuracy is recommended and written as ``recommended.yaml``.

Nothing is chosen on test accuracy: test numbers are measured for every variant and reported, never compared
to pick one (tests/test_doctor.py replaces the test labels with noise and gets the same recommendation).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgap import __version__
from fedgap.config import Config, config_to_dict, dump_yaml
from fedgap.diagnose import variants as V
from fedgap.diagnose.diagnosis import Finding, write_diagnosis
from fedgap.diagnose.gap import GapRow, gap_rows, noise_pp
from fedgap.diagnose.pool import RunRecord, RunSpec, run_all
from fedgap.diagnose.tuning import TuneResult, budget_rounds, rungs_for, successive_halving, validation_score
from fedgap.errors import ConfigError
from fedgap.experiment import outputs
from fedgap.preflight import check_inputs
from fedgap.track.command import CommandRun

GAP_COLUMNS = ["variant", "final_test_accuracy", "gap_pp", "rounds_to_target", "final_val_accuracy", "chosen",
               "searched", "final_std", "best_test_accuracy", "best_std", "gap_equal_samples_pp", "gap_closed",
               "reached", "seeds", "rounds", "wall_seconds", "cause", "label", "changes", "error", "diverged",
               "last_test_accuracy", "late_sem"]
RECOMMENDED = "recommended.yaml"


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
    recommended: V.Variant | None = None
    tuning: dict[str, TuneResult] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)

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
               command: str = "fedgap doctor", remedies: tuple[str, ...] | None = None,
               render: Callable[[DoctorResult], None] | None = None) -> DoctorResult:
    """The doctor (module docstring). ``render`` writes the documents (report.html, gap.md) of the result, before
    a tracked doctor logs its files (the CLI passes ``fedgap.report.write_doctor_report``)."""
    t0 = time.perf_counter()
    p = V.PRESETS[preset]
    if remedies is not None:
        unknown = [k for k in remedies if k not in V.REMEDY_BY_KEY]
        if unknown:
            raise ConfigError(f"--remedies: unknown {', '.join(unknown)}; known: {', '.join(V.REMEDY_BY_KEY)}")
        p = dataclasses.replace(p, remedies=tuple(remedies))
    tree = V.base_tree(p, config_path, overrides)
    naive = V.config_from_dict(tree)
    if naive.data.partition == "central":
        raise ConfigError("data.partition: the doctor compares federated with centralized training; give a "
                          "federated partition (iid | dirichlet | shards | quantity), not central")
    if naive.data.validation <= 0:
        raise ConfigError("data.validation: the doctor chooses hyper-parameters and remedies on a validation "
                          f"split, never on the test set; give a share > 0 (default {p.validation})")
    check_inputs(naive)  # a bad data file or model fails here, in one line, before --out is touched
    outputs.prepare_dir(out)
    lock = outputs.RunLock(out)  # one doctor per folder; its runs have their own locks
    try:
        with CommandRun(naive, out, "doctor") as tracking:  # track.mlflow: the parent run of the variants' runs
            result = _diagnose(naive, tree, p, seeds, out, jobs, target, show_progress, command, t0)
            if render is not None:
                render(result)
        tracking.finish(["report.html", "gap.csv", "gap.md", "summary.json", RECOMMENDED],
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
    data = load_dataset(d.name, d.root, d.path)
    labels = data.train_y.numpy()
    parts = partition_for(d, labels, naive.seed)
    stats = partition_stats(parts, labels, data.num_classes)

    # 1. the baselines, run with the first rung of 2. every remedy tuned on the validation split
    epochs = central_epochs(naive, p, sum(len(x) for x in parts), [len(x) for x in parts])
    central = V.Variant("central", "centralized", "", V.central_config(naive, epochs))
    naive_v = V.Variant("naive", "naive", "", naive)
    baselines, owners = _specs([central, naive_v], seeds)
    searches, skipped = V.searches(naive, tree, p)
    budget = {"rungs": rungs_for(p.rungs, naive.server.rounds), "keep": p.keep,
              "candidates": sum(len(s.grid) for s in searches),
              "planned_rounds": budget_rounds(searches, p.rungs, p.keep, naive.server.rounds)}
    tuning, got = successive_halving(searches, tree, p.rungs, p.keep, out, rounds=naive.server.rounds, jobs=jobs,
                                     show_progress=show_progress, title=f"doctor ({preset}): tuning",
                                     also=baselines)
    records: dict[str, list[RunRecord]] = {"central": [], "naive": []}
    for key, rec in zip(owners, got, strict=True):
        records[key].append(rec)
    budget["trained_rounds"] = sum(r.rounds_trained for r in tuning.values())
    singles = []
    for key, res in tuning.items():
        v = V.Variant(key, res.search.remedy.label, res.search.remedy.cause,
                      res.search.candidate(tree, res.best.point), res.search.overrides + res.best.point)
        singles.append(v)
        records[key] = [res.best.record]
    scores = {v.key: validation_score(records[v.key][0]) for v in [central, naive_v, *singles]}

    # 3. the combination, by greedy forward selection on validation accuracy
    combos, notes, spent = _forward_selection(naive, tree, singles, scores, p, out, jobs, show_progress, records,
                                              tuning)
    budget["combination_rounds"], budget["combination_retune"] = spent, p.combine_retune
    variants = [central, naive_v, *singles, *combos]
    if seeds > 1:  # more seeds of what was chosen, for the report (selection used seed 0 only)
        extra = _run([v for v in variants if v.key not in ("central", "naive")], seeds, out, jobs, show_progress,
                     f"doctor ({preset}): more seeds", first=1)
        for key, recs in extra.items():
            records[key] = records[key][:1] + recs

    # 4. the recommendation: the highest validation accuracy of any federated variant
    candidates = [v for v in variants if v.key != "central" and scores.get(v.key) is not None]
    recommended = max(candidates, key=lambda v: scores[v.key]) if candidates else None

    naive_rows = gap_rows([central, naive_v], records, "central", "naive", target or 0.0)
    naive_row = next(r for r in naive_rows if r.variant == "naive")
    if target is None:
        target_source = "the naive run's final accuracy"
        target = math.floor(1000 * (naive_row.final_test_accuracy or 0)) / 1000
    else:
        target_source = "given with --target"
    rows = gap_rows(variants, records, "central", "naive", target)
    for r in rows:
        if r.variant in tuning:
            res = tuning[r.variant]
            r.chosen, r.searched = " ".join(res.best.point), res.searched()
    findings = write_diagnosis(rows, records["naive"], records["central"], stats.summary(), noise_pp(rows),
                               seeds, target, target_source, recommended=recommended.key if recommended else None,
                               tuning=tuning)
    cut = p.cut(naive, epochs, seeds)
    result = DoctorResult(out, p, variants, records, rows, target, target_source, findings, cut, skipped,
                          stats.summary(), stats.counts, time.perf_counter() - t0, "", notes, recommended,
                          tuning, budget)
    result.command = command
    write_outputs(result)
    return result


def _specs(variants: list[V.Variant], seeds: int, first: int = 0) -> tuple[list[RunSpec], list[str]]:
    """One spec per variant and seed, and the variant key of each."""
    specs, owners = [], []
    for v in variants:
        for i in range(first, seeds):
            specs.append(RunSpec(f"{v.key}-s{i}", seeded(v.cfg, i), diagnostics=v.key == "naive"))
            owners.append(v.key)
    return specs, owners


def _run(variants: list[V.Variant], seeds: int, out: Path, jobs: int | None, show_progress: bool,
         title: str, first: int = 0) -> dict[str, list[RunRecord]]:
    specs, owners = _specs(variants, seeds, first)
    got = run_all(specs, out, jobs=jobs, title=title, show_progress=show_progress) if specs else []
    records: dict[str, list[RunRecord]] = {v.key: [] for v in variants}
    for key, rec in zip(owners, got, strict=True):
        records[key].append(rec)
    return records


def _forward_selection(naive: Config, tree: dict, singles: list[V.Variant], scores: dict[str, float | None],
                       p: V.DoctorPreset, out: Path, jobs: int | None, show_progress: bool,
                       records: dict[str, list[RunRecord]],
                       tuning: dict[str, TuneResult]) -> tuple[list[V.Variant], list[str], int]:
    """Greedy forward selection over the remedies of different causes, on validation accuracy.

    Start from the best tuned remedy; each step adds every cause not yet in the set through its best remedy,
    with that remedy's own hyper-parameters tuned again on top of the set by the same successive halving
    (a server lr or a FedDyn alpha tuned under plain cross-entropy need not suit logit adjustment; the set's
    client lr stays), all causes' searches in one halving (``p.combine_retune`` False: each at the values it
    was tuned to alone, one candidate); it keeps the addition that raises validation accuracy
    most and stops when none does or after ``p.combine_steps`` additions. Client objectives of two causes are
    joined (``logit_adjust+feddyn``). Each addition's tuning goes into ``tuning`` under its key. Returns the
    variants tried, notes for the report and the training rounds spent."""
    notes: list[str] = []
    ranked = sorted((v for v in singles if scores.get(v.key) is not None), key=lambda v: -scores[v.key])
    if not ranked:
        return [], ["no tuned variant finished; no combination was searched"], 0
    best_of_cause: dict[str, V.Variant] = {}  # remedies of causes; tuned FedAvg is a reference, not a cause
    for v in ranked:
        if v.cause in V.CAUSES:
            best_of_cause.setdefault(v.cause, v)
    if not best_of_cause:
        return [], ["no remedy finished; no combination was searched"], 0
    current = max(best_of_cause.values(), key=lambda v: scores[v.key])
    causes, current_score = {current.cause}, scores[current.key]
    tried: list[V.Variant] = []
    spent = 0
    for _ in range(p.combine_steps):
        searches = [V.added_search(tree, current, v, naive, p.combine_retune)
                    for c, v in best_of_cause.items() if c not in causes]
        if not searches:
            break
        step, _ = successive_halving(searches, tree, p.rungs, p.keep, out, rounds=naive.server.rounds, jobs=jobs,
                                     show_progress=show_progress, title=f"doctor ({p.name}): combination")
        options = []
        for key, res in step.items():
            label = f"{current.label} + {res.search.remedy.label}"
            v = V.Variant(key, label, "combined", res.search.candidate(tree, res.best.point),
                          res.search.overrides + res.best.point)
            records[key], scores[key], tuning[key] = [res.best.record], validation_score(res.best.record), res
            spent += res.rounds_trained
            options.append((v, res.search.remedy.cause))
        tried += [v for v, _ in options]
        step_best, cause = max(options, key=lambda o: scores[o[0].key] if scores[o[0].key] is not None else -1.0)
        if scores[step_best.key] is None or current_score is None or scores[step_best.key] <= current_score:
            notes.append(f"adding a remedy of another cause to {current.label} did not raise validation accuracy; "
                         f"the search stopped there")
            break
        current, current_score = step_best, scores[step_best.key]
        causes.add(cause)
    return tried, notes, spent


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
    outputs.write_json(res.out / "summary.json", summary_dict(res))
