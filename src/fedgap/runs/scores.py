"""What a finished run scores, read from its metrics rows: the one definition of the late mean and of the
selection score that the doctor, sweeps and reports share.

- The **late mean** of a metric is the mean of its last ``LATE_EVALS`` evaluated values. One evaluation does not
  rank runs under label skew: at Dirichlet alpha 0.1 the global model swings by about 10 pp from one evaluation
  to the next (the sampled clients' labels pull it around), so the last evaluation alone is luck as much as skill.
- The **selection score** of a run is the late mean of its validation accuracy (``data.validation``), or None for
  a failed or diverged run: what the doctor and ranked sweeps choose by. Never a test number.
"""

from __future__ import annotations

import math

import numpy as np

from fedgap.runs.records import RunRecord

LATE_EVALS = 3


def evaluated(record: RunRecord, key: str, up_to_round: int | None = None) -> list[float]:
    """The run's values of ``key`` at its evaluated rounds (those up to ``up_to_round`` if given), in order."""
    return [float(r[key]) for r in record.rows if r.get(key) is not None
            and (up_to_round is None or int(r["round"]) <= up_to_round)]


def late_mean(values: list[float]) -> float | None:
    """The mean of the last ``LATE_EVALS`` values; None without any."""
    return float(np.mean(values[-LATE_EVALS:])) if values else None


def late_accuracy(record: RunRecord, key: str = "test_accuracy") -> tuple[float | None, float | None]:
    """(late mean, its standard error: spread of those evaluations / sqrt(count)) of ``key``; (None, None) without
    any evaluation, (mean, None) with one."""
    tail = evaluated(record, key)[-LATE_EVALS:]
    if not tail:
        return None, None
    sem = float(np.std(tail, ddof=1) / math.sqrt(len(tail))) if len(tail) > 1 else None
    return late_mean(tail), sem


def validation_score(record: RunRecord | None, up_to_round: int | None = None) -> float | None:
    """The selection score: late mean of the validation accuracy (of the evaluations up to ``up_to_round`` if
    given: a longer run's score at a rung); None for a failed or diverged run."""
    if record is None or not record.ok or (record.summary or {}).get("diverged_at_round"):
        return None
    return late_mean(evaluated(record, "val_accuracy", up_to_round))


def accuracies(record: RunRecord) -> list[tuple[int, float]]:
    """(round, test accuracy) of every evaluated round."""
    return [(int(r["round"]), float(r["test_accuracy"])) for r in record.rows if r.get("test_accuracy") is not None]


def first_round_at(record: RunRecord, target: float) -> int | None:
    """The first evaluated round whose test accuracy reaches ``target``."""
    return next((rnd for rnd, acc in accuracies(record) if acc >= target - 1e-12), None)
