"""The gap table: every number in it is computed here from the runs' own metrics.

- ``final_test_accuracy``: the mean test accuracy of the last ``LATE_EVALS`` evaluations of a run (then the
  mean over seeds). One evaluation does not rank remedies under label skew: at alpha 0.1 the global model
  swings by 10 pp from one evaluation to the next (the sampled clients' labels pull it around), so the last
  evaluation alone is luck as much as skill. ``last_test_accuracy`` is that last evaluation;
  ``late_sem`` the standard error of the late mean (spread of those evaluations / sqrt(count)).
- ``gap_pp``: centralized final accuracy minus the variant's final accuracy, in percentage points.
- ``gap_equal_samples_pp``: the same against the centralized run's accuracy after the same number of training
  samples as the variant processed (linear in samples between the centralized run's epochs): federated
  training is compared with centralized training given the same compute.
- ``gap_closed``: the share of the naive run's gap that the variant closes, (gap_naive - gap) / gap_naive.
- ``rounds_to_target``: the first evaluated round at which the variant reaches the target accuracy (the mean
  over seeds that reached it; ``reached`` says how many did).
Means and standard deviations are over seeds (standard deviation 0 with one seed).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from fedgap.runs.records import RunRecord
from fedgap.runs.scores import first_round_at, late_accuracy


@dataclass
class GapRow:
    variant: str
    label: str
    cause: str
    seeds: int
    final_test_accuracy: float | None  # mean of the last LATE_EVALS evaluations
    final_std: float | None
    best_test_accuracy: float | None
    best_std: float | None
    gap_pp: float | None
    gap_equal_samples_pp: float | None
    gap_closed: float | None
    rounds_to_target: float | None
    reached: int
    rounds: int
    wall_seconds: float
    changes: str
    error: str | None = None
    last_test_accuracy: float | None = None
    late_sem: float | None = None
    diverged: int = 0  # seeds whose run stopped on a non-finite model (diverged_at_round in their summary)
    final_val_accuracy: float | None = None  # mean of the last LATE_EVALS validation evaluations: what selects
    chosen: str = ""  # the tuned hyper-parameters (overrides) of this variant
    searched: str = ""  # the search space they were chosen from

    def as_dict(self) -> dict:
        return asdict(self)

    def selection_score(self) -> float:
        """What variants are compared by: validation accuracy (test accuracy only where runs have no validation
        split, e.g. reports of older runs); -1 for a variant without either."""
        v = self.final_val_accuracy if self.final_val_accuracy is not None else self.final_test_accuracy
        return -1.0 if v is None else v


def accuracy_at_samples(central: RunRecord, samples: float) -> float | None:
    """The centralized run's test accuracy after ``samples`` training samples, linear between its
    evaluations; None before its first evaluation and beyond its end (no measurement there)."""
    xs, ys = [0.0], [None]
    total = 0.0
    for r in central.rows:
        total += float(r["samples"])
        if r.get("test_accuracy") is not None:
            xs.append(total)
            ys.append(float(r["test_accuracy"]))
    if len(xs) < 2 or samples > xs[-1] + 1e-9:
        return None
    if samples < xs[1]:
        return None  # less than the first evaluated epoch: no measurement to compare with
    i = max(2, int(np.searchsorted(xs, samples)))
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (samples - x0) / (x1 - x0)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def train_samples(record: RunRecord) -> float:
    return float(sum(float(r["samples"]) for r in record.rows))


def gap_rows(variants: list, records: dict[str, list[RunRecord]], central_key: str, naive_key: str,
             target: float) -> list[GapRow]:
    """One row per variant (central and naive included), ranked by validation accuracy where runs have a
    validation split (what the doctor selects on), else by final test accuracy; failed runs last."""
    central = [r for r in records[central_key] if r.ok]
    central_final = _mean_std([m for m, _ in map(late_accuracy, central) if m is not None])[0]
    rows: list[GapRow] = []
    for v in variants:
        recs = records[v.key]
        ok = [r for r in recs if r.ok]
        late = [late_accuracy(r) for r in ok]  # (mean, standard error) per seed, aligned with ok
        finals = [m for m, _ in late if m is not None]
        sems = [e for _, e in late if e is not None]
        lasts = [r.summary["final_test_accuracy"] for r in ok if r.summary["final_test_accuracy"] is not None]
        bests = [r.summary["best_test_accuracy"] for r in ok if r.summary["best_test_accuracy"] is not None]
        final, final_std = _mean_std(finals)
        val = _mean_std([m for m, _ in (late_accuracy(r, "val_accuracy") for r in ok) if m is not None])[0]
        best, best_std = _mean_std(bests)
        gap = None if final is None or central_final is None else 100 * (central_final - final)
        equal = []
        for r, (m, _), c in zip(ok, late, central, strict=False):  # seed i against central seed i
            at = accuracy_at_samples(c, train_samples(r))
            if at is not None and m is not None:
                equal.append(100 * (at - m))
        reached = [first_round_at(r, target) for r in ok]
        hit = [x for x in reached if x is not None]
        rows.append(GapRow(
            variant=v.key, label=v.label, cause=v.cause, seeds=len(ok), final_test_accuracy=final,
            final_std=final_std, best_test_accuracy=best, best_std=best_std, gap_pp=gap,
            gap_equal_samples_pp=float(np.mean(equal)) if equal else None, gap_closed=None,
            rounds_to_target=float(np.mean(hit)) if hit else None, reached=len(hit),
            rounds=max((r.summary["rounds_completed"] for r in ok), default=0),
            wall_seconds=float(sum(r.summary["wall_seconds"] for r in ok)),
            changes=" ".join(v.overrides), error=next((r.error for r in recs if r.error), None),
            diverged=sum(1 for r in ok if r.summary.get("diverged_at_round")),
            last_test_accuracy=_mean_std(lasts)[0],
            late_sem=float(np.mean(sems)) / math.sqrt(len(sems)) if sems else None,
            final_val_accuracy=val,
        ))
    naive = next(r for r in rows if r.variant == naive_key)
    for row in rows:
        if row.variant == central_key or row.gap_pp is None or naive.gap_pp is None or naive.gap_pp <= 0:
            continue
        row.gap_closed = (naive.gap_pp - row.gap_pp) / naive.gap_pp
    return sorted(rows, key=lambda r: (r.final_test_accuracy is None, -r.selection_score()))


def status(row: GapRow) -> str:
    """' (failed)' / ' (diverged)' after a variant's label, or ''."""
    if row.error:
        return " (failed)"
    if row.diverged:
        return " (diverged)" if row.diverged == row.seeds else f" (diverged in {row.diverged}/{row.seeds} seeds)"
    return ""


def evaluation_noise_pp(rows: list[GapRow]) -> float | None:
    """Typical standard error (pp) of a federated run's late mean: how much its last evaluations disagree."""
    sems = [100 * r.late_sem for r in rows if r.variant != "central" and r.late_sem is not None]
    return float(np.median(sems)) if sems else None


def noise_pp(rows: list[GapRow]) -> float | None:
    """Typical seed-to-seed standard deviation of final accuracy (pp), when there are several seeds."""
    stds = [100 * r.final_std for r in rows if r.seeds > 1 and r.final_std is not None]
    return float(np.median(stds)) if stds else None


def fmt_pct(x: float | None, std: float | None = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.2f}%" + (f" ± {100 * std:.2f}" if std else "")
