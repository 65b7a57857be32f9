"""Fair tuning: every remedy at its own best hyper-parameters, chosen by synchronous successive halving on the
validation split (Jamieson & Talwalkar 2016; Li et al. 2018, Hyperband's inner loop).

All candidates of every search (a remedy's grid of hyper-parameter values) train for the first rung's rounds;
each search keeps the best 1/keep of its candidates by validation score; those continue to the next rung, and
so on until the last rung (the preset's rounds); a search with one candidate left (or one from the start) runs
it at the last rung, beside the others' continuing runs. The score is a run's selection score
(``fedgap.runs.scores.validation_score``: the late mean of its validation accuracy), never a test number. A
continuing candidate is the same run extended (the pool resumes it from its checkpoint), so halving costs no
repeated rounds.

Why not an asynchronous pruner (Optuna's SuccessiveHalvingPruner, Ray Tune's ASHA): they decide on each
trial as its results arrive, so with runs in parallel the choice depends on which finished first, and the same
seed would not give the same recommendation. Synchronous rungs give the same choice on every machine and every
rerun, and every rung's candidates run in parallel on the pool anyway; what is left to write is a sort.

The search is a function of its inputs: it runs specs only through ``SearchContext.run`` (the doctor passes the
pool; tests pass a fake) and returns its results, touching nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from fedgap.config import Config
from fedgap.diagnose.variants import Search
from fedgap.runs.records import RunRecord, RunSpec
from fedgap.runs.scores import validation_score

RunFn = Callable[[Sequence[RunSpec], str], list[RunRecord]]  # (specs, title) -> one record per spec, in order


@dataclass(frozen=True)
class SearchContext:
    """What every search of one doctor shares: the naive run's config tree (candidates are overrides on it), the
    halving schedule, the run length and how runs are run."""

    tree: dict
    rungs: tuple[int, ...]  # the preset's rungs (those below ``rounds`` are used, then ``rounds``)
    keep: int  # a rung keeps the best 1/keep of a search's candidates
    rounds: int
    run: RunFn
    title: str = "tuning"

    def titled(self, title: str) -> SearchContext:
        return replace(self, title=title)


@dataclass
class Trial:
    search: Search
    index: int  # position in the search's grid
    point: tuple[str, ...]
    scores: dict[int, float | None] = field(default_factory=dict)  # rung rounds -> validation score
    record: RunRecord | None = None

    @property
    def name(self) -> str:
        return f"{self.search.key}-{self.index}"

    def rank_key(self, rounds: int) -> tuple:
        score = self.scores.get(rounds)
        return (score is None, -(score or 0.0), self.index)  # failed last; ties: grid order


@dataclass
class TuneResult:
    search: Search
    best: Trial
    trials: list[Trial]
    rounds_trained: int  # the search's total training rounds (extended runs counted once)

    def searched(self) -> str:
        if not self.search.space and self.best.point:
            return "its values tuned alone, kept"  # a remedy added to a set without tuning it again
        return "; ".join(k.describe() for k in self.search.space) or "nothing to tune"

    @property
    def score(self) -> float | None:
        """The chosen candidate's selection score at the full length."""
        return validation_score(self.best.record)


@dataclass
class Halving:
    results: dict[str, TuneResult]  # search key -> its result
    also: list[RunRecord]  # the records of the runs that went with the first rung


def rungs_for(rungs: tuple[int, ...], rounds: int) -> list[int]:
    """The preset's rungs below the run length, then the run length itself."""
    return [r for r in rungs if r < rounds] + [rounds]


def successive_halving(searches: list[Search], ctx: SearchContext, also: Sequence[RunSpec] = ()) -> Halving:
    """Every search tuned by synchronous successive halving (module docstring). ``also``: runs that go with the
    first rung's batch (the doctor's baselines), so no core idles while a long baseline runs alone."""
    trials = {s.key: [Trial(s, i, p) for i, p in enumerate(s.grid)] for s in searches}
    also_records: list[RunRecord] = []
    alive = {k: list(v) for k, v in trials.items()}
    steps = rungs_for(ctx.rungs, ctx.rounds)
    for level, length in enumerate(steps):
        last = level == len(steps) - 1
        # a search down to one candidate goes straight to the last rung: an intermediate score decides nothing.
        # The runs with the most rounds still to train start first, so no core idles at the end of the batch.
        batch = [t for ts in alive.values() for t in ts if last or len(ts) > 1]
        batch.sort(key=lambda t: max(t.scores, default=0))
        specs = [RunSpec(t.name, _at_length(t.search.candidate(ctx.tree, t.point), length)) for t in batch]
        extra = list(also) if level == 0 else []
        if not specs and not extra:
            continue  # every search has one candidate: nothing to compare before the last rung
        records = ctx.run(extra + specs, f"{ctx.title}: rung {level + 1} of {len(steps)} ({length} rounds)")
        also_records, records = records[: len(extra)] or also_records, records[len(extra):]
        for t, rec in zip(batch, records, strict=True):
            t.record, t.scores[length] = rec, validation_score(rec)
        if not last:
            for key, ts in alive.items():
                if len(ts) > 1:
                    ts.sort(key=lambda t, n=length: t.rank_key(n))
                    alive[key] = ts[: max(1, len(ts) // ctx.keep)]
    results = {}
    for key, ts in alive.items():
        best = min(ts, key=lambda t: t.rank_key(ctx.rounds))
        trained = sum(max(t.scores, default=0) for t in trials[key])
        results[key] = TuneResult(ts[0].search, best, trials[key], trained)
    return Halving(results, also_records)


def _at_length(cfg: Config, rounds: int) -> Config:
    copy = cfg.model_copy(deep=True)
    copy.server.rounds = rounds
    return copy


def budget_rounds(searches: list[Search], rungs: tuple[int, ...], keep: int, rounds: int) -> int:
    """Training rounds the halving will spend (before it runs: the stated budget)."""
    steps = rungs_for(rungs, rounds)
    total = 0
    for s in searches:
        n, done = len(s.grid), 0
        if n == 1:
            total += rounds
            continue
        for length in steps:
            total += n * (length - done)
            done = length
            n = max(1, n // keep) if n > 1 else 1
            if n == 1 and length != steps[-1]:
                total += rounds - done
                break
    return total


__all__ = ["Halving", "RunFn", "SearchContext", "Trial", "TuneResult", "budget_rounds", "rungs_for",
           "successive_halving"]
