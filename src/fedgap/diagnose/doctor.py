"""``fedgap doctor``: run the centralized baseline and the naive run, tune every remedy on a validation split,
search the combination, measure the gap, explain it, and write the winner as ``recommended.yaml``.

Phases, each through one run function (the pool: runs cached in ``OUT/runs`` by config hash, so a killed doctor
started again only does what is missing and a second call with the same settings reruns nothing):

1. the centralized baseline and the naive run (the user's setting as given, with diagnostics);
2. every remedy and a tuned-FedAvg row at their own best hyper-parameters, by successive halving on the
   validation accuracy (``fedgap.diagnose.tuning``);
3. greedy forward selection: starting from the best tuned variant, add the best-tuned remedy of another cause
   while that raises validation accuracy (``fedgap.diagnose.combine``);
4. the variant with the highest validation accuracy is recommended and written as ``recommended.yaml``
   (``fedgap.diagnose.outputs`` writes the data files).

Nothing is chosen on test accuracy: test numbers are measured for every variant and reported, never compared
to pick one (tests/test_doctor.py replaces the test labels with noise and gets the same recommendation).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

from fedgap.config import Config
from fedgap.diagnose import variants as V
from fedgap.diagnose.combine import forward_selection
from fedgap.diagnose.diagnosis import write_diagnosis
from fedgap.diagnose.facts import ModelFacts, facts_of
from fedgap.diagnose.gap import gap_rows, noise_pp
from fedgap.diagnose.outputs import RECOMMENDED, check_out, write_outputs
from fedgap.diagnose.result import DoctorResult
from fedgap.diagnose.tuning import RunFn, SearchContext, TuneResult, budget_rounds, rungs_for, successive_halving
from fedgap.errors import ConfigError
from fedgap.experiment import outputs
from fedgap.fl.device import check_device
from fedgap.preflight import check_inputs
from fedgap.runs.pool import run_all
from fedgap.runs.records import RunRecord, RunSpec
from fedgap.runs.scores import validation_score
from fedgap.track.command import CommandRun


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


def pool_runner(out: Path, jobs: int | None, show_progress: bool, threads: int | None = None) -> RunFn:
    """The doctor's run function on this machine: the local pool, its runs cached under ``out``."""
    return lambda specs, title: run_all(specs, out, jobs=jobs, threads=threads, title=title,
                                        show_progress=show_progress)


def run_doctor(config_path: str | None, overrides: list[str], *, preset: str = "quick", seeds: int = 1,
               out: Path, jobs: int | None = None, target: float | None = None, show_progress: bool = True,
               command: str = "fedgap doctor", remedies: tuple[str, ...] | None = None,
               render: Callable[[DoctorResult], None] | None = None, threads: int | None = None,
               overwrite: bool = False, cluster: str | None = None, gpus_per_run: float = 0.0) -> DoctorResult:
    """The doctor (module docstring). ``render`` writes the documents (report.html, gap.md) of the result, before
    a tracked doctor logs its files (the CLI passes ``fedgap.report.write_doctor_report``). ``cluster``: run on a
    Ray cluster instead of the local pool (``fedgap.runs.cluster``), with ``gpus_per_run`` of a GPU per run."""
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
    check_out(out, overwrite)  # a folder of the user's or a finished run's is refused, before anything runs
    _, model, _ = check_inputs(naive)  # a bad data file or model fails here, in one line, before --out is touched
    if cluster is not None:  # joined and checked here, before --out is touched
        from fedgap.runs.cluster import cluster_runner

        runner = cluster_runner(out, cluster, naive, jobs=jobs, threads=threads, gpus_per_run=gpus_per_run,
                                show_progress=show_progress)
    else:
        check_device(naive.engine.device)  # the local pool's runs train on this machine
        runner = nullcontext(pool_runner(out, jobs, show_progress, threads))
    with runner as run:
        return _doctor_in(out, naive, tree, p, seeds, run, target, command, t0, facts_of(model), render)


def _doctor_in(out: Path, naive: Config, tree: dict, p: V.DoctorPreset, seeds: int, run: RunFn,
               target: float | None, command: str, t0: float, facts: ModelFacts,
               render: Callable[[DoctorResult], None] | None) -> DoctorResult:
    """Phases 1-4 with ``out`` locked and tracked, then the outputs written."""
    lock = outputs.lock_dir(out)  # one doctor per folder (a second one leaves it untouched); runs have their own
    try:
        with CommandRun(naive, out, "doctor") as tracking:  # track.mlflow: the parent run of the variants' runs
            result = diagnose(naive, tree, p, seeds, out, run, target, command, t0, facts)
            write_outputs(result)
            if render is not None:
                render(result)
        tracking.finish(["report.html", "gap.csv", "gap.md", "summary.json", RECOMMENDED],
                        {f"{k}/{r.variant}": getattr(r, k) for r in result.rows
                         for k in ("final_test_accuracy", "gap_pp") if getattr(r, k) is not None})
        return result
    finally:
        lock.release()


def diagnose(naive: Config, tree: dict, p: V.DoctorPreset, seeds: int, out: Path, run: RunFn,
             target: float | None, command: str, t0: float, facts: ModelFacts | None = None) -> DoctorResult:
    """Phases 1-4 (module docstring), every run through ``run``; returns the result without writing it.
    ``facts``: the naive model's BatchNorm settings (which remedies apply; named in the diagnosis)."""
    from fedgap.data.datasets import load_dataset
    from fedgap.data.partition import partition_for, partition_stats

    d = naive.data
    data = load_dataset(d.name, d.root, d.path)
    labels = data.train_y.numpy()
    parts = partition_for(d, labels, naive.seed)
    stats = partition_stats(parts, labels, data.num_classes)

    # 1. the baselines, run with the first rung of 2. every remedy tuned on the validation split
    epochs = central_epochs(naive, p, sum(len(x) for x in parts), [len(x) for x in parts])
    central = V.Variant("central", "centralized", "", V.central_config(naive, epochs))
    naive_v = V.Variant("naive", "naive", "", naive)
    searches, skipped = V.searches(naive, tree, p, facts)
    ctx = SearchContext(tree, p.rungs, p.keep, naive.server.rounds, run, f"doctor ({p.name}): tuning")
    budget = {"rungs": rungs_for(p.rungs, naive.server.rounds), "keep": p.keep,
              "candidates": sum(len(s.grid) for s in searches),
              "planned_rounds": budget_rounds(searches, p.rungs, p.keep, naive.server.rounds)}
    baselines = _specs([central, naive_v], seeds)
    halving = successive_halving(searches, ctx, also=[spec for _, spec in baselines])
    records = _by_variant(baselines, halving.also, ["central", "naive"])
    budget["trained_rounds"] = sum(r.rounds_trained for r in halving.results.values())
    singles = [_tuned_variant(tree, key, res, res.search.remedy.label, res.search.remedy.cause)
               for key, res in halving.results.items()]
    scores = {"central": validation_score(records["central"][0]), "naive": validation_score(records["naive"][0])}
    scores.update({key: res.score for key, res in halving.results.items()})

    # 3. the combination, by greedy forward selection on validation accuracy
    selection = forward_selection(singles, scores, naive, ctx.titled(f"doctor ({p.name}): combination"),
                                  p.combine_steps, p.combine_retune)
    tuning: dict[str, TuneResult] = {**halving.results, **selection.tuning}
    records.update({key: [res.best.record] for key, res in tuning.items()})
    scores.update({key: res.score for key, res in selection.tuning.items()})
    budget["combination_rounds"], budget["combination_retune"] = selection.rounds, p.combine_retune
    variants = [central, naive_v, *singles, *selection.tried]
    if seeds > 1:  # more seeds of what was chosen, for the report (selection used seed 0 only)
        chosen = [v for v in variants if v.key not in ("central", "naive")]
        extra = _specs(chosen, seeds, first=1)
        got = run([spec for _, spec in extra], f"doctor ({p.name}): more seeds") if extra else []
        for key, recs in _by_variant(extra, got, [v.key for v in chosen]).items():
            records[key] = records[key][:1] + recs

    # 4. the recommendation: the highest validation accuracy of any federated variant
    candidates = [v for v in variants if v.key != "central" and scores.get(v.key) is not None]
    recommended = max(candidates, key=lambda v: scores[v.key]) if candidates else None

    naive_row = next(r for r in gap_rows([central, naive_v], records, "central", "naive", target or 0.0)
                     if r.variant == "naive")
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
                               tuning=tuning, facts=facts)
    return DoctorResult(
        out=out, preset=p, variants=variants, records=records, rows=rows, target=target,
        target_source=target_source, findings=findings, cut=p.cut(naive, epochs, seeds), skipped=skipped,
        partition=stats.summary(), heatmap_counts=stats.counts, seconds=time.perf_counter() - t0, command=command,
        notes=selection.notes, recommended=recommended, tuning=tuning, budget=budget, facts=facts)


def _tuned_variant(tree: dict, key: str, res: TuneResult, label: str, cause: str) -> V.Variant:
    """The variant a search chose: its candidate config and everything it changes against the naive run."""
    return V.Variant(key, label, cause, res.search.candidate(tree, res.best.point),
                     res.search.overrides + res.best.point)


def _specs(variants: list[V.Variant], seeds: int, first: int = 0) -> list[tuple[str, RunSpec]]:
    """(variant key, run spec) for every variant and seed."""
    return [(v.key, RunSpec(f"{v.key}-s{i}", seeded(v.cfg, i), diagnostics=v.key == "naive"))
            for v in variants for i in range(first, seeds)]


def _by_variant(specs: Sequence[tuple[str, RunSpec]], records: list[RunRecord],
                keys: list[str]) -> dict[str, list[RunRecord]]:
    """The records of ``specs`` grouped by variant key, in seed order."""
    out: dict[str, list[RunRecord]] = {key: [] for key in keys}
    for (key, _), rec in zip(specs, records, strict=True):
        out[key].append(rec)
    return out
