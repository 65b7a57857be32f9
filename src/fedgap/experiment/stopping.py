"""Stop rules as round callbacks: each says, from the metrics rows so far, why the run should end early (or
None). The loop asks them after every round and when a resumed run starts (a run stopped by a rule is
finished); ``Experiment.summary`` reads the same rules, so one condition is written once."""

from __future__ import annotations

from typing import Any

from fedgap.callbacks import RoundCallback


class StopOnDivergence(RoundCallback):
    """A non-finite weight never recovers: the run ends after the round that produced one (marked in its row)."""

    @staticmethod
    def diverged_at(rows: list[dict[str, Any]]) -> int | None:
        return next((r["round"] for r in rows if r.get("diverged")), None)

    def stop_reason(self, rows: list[dict[str, Any]]) -> str | None:
        at = self.diverged_at(rows)
        return None if at is None else f"diverged after round {at}"


class StopAtTarget(RoundCallback):
    """``eval.stop_at_target``: the run ends at the first evaluation reaching ``eval.target``."""

    def __init__(self, target: float):
        self.target = target

    def stop_reason(self, rows: list[dict[str, Any]]) -> str | None:
        hit = next((r["round"] for r in rows if (r.get("test_accuracy") or 0.0) >= self.target), None)
        return None if hit is None else f"reached {self.target:.2%} at round {hit}"
