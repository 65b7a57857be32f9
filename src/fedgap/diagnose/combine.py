"""The combination search: greedy forward selection over the tuned remedies of different causes, on validation.

Start from the best tuned remedy; each step adds every cause not yet in the set through its best remedy, with
that remedy's own hyper-parameters tuned again on top of the set by the same successive halving (a server lr or
a FedDyn alpha tuned under plain cross-entropy need not suit logit adjustment; the set's client lr stays), all
causes' searches in one halving (``retune`` False: each at the values it was tuned to alone, one candidate); it
keeps the addition that raises validation accuracy most and stops when none does or after ``steps`` additions.
Client objectives of two causes are joined (``logit_adjust+feddyn``).

A function of its inputs: runs go through ``SearchContext.run``, and the result is returned, nothing else changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fedgap.config import Config
from fedgap.diagnose import variants as V
from fedgap.diagnose.tuning import SearchContext, TuneResult, successive_halving


@dataclass
class Selection:
    tried: list[V.Variant] = field(default_factory=list)  # every set tried, in order
    tuning: dict[str, TuneResult] = field(default_factory=dict)  # each tried set's search (its key -> result)
    notes: list[str] = field(default_factory=list)  # for the report
    rounds: int = 0  # training rounds spent

    def score(self, key: str) -> float | None:
        return self.tuning[key].score


def forward_selection(singles: list[V.Variant], scores: Mapping[str, float | None], naive: Config,
                      ctx: SearchContext, steps: int, retune: bool) -> Selection:
    """The greedy search (module docstring) from the tuned remedies ``singles`` and their validation ``scores``."""
    out = Selection()
    ranked = sorted((v for v in singles if scores.get(v.key) is not None), key=lambda v: -scores[v.key])
    if not ranked:
        out.notes.append("no tuned variant finished; no combination was searched")
        return out
    best_of_cause: dict[str, V.Variant] = {}  # remedies of causes; tuned FedAvg is a reference, not a cause
    for v in ranked:
        if v.cause in V.CAUSES:
            best_of_cause.setdefault(v.cause, v)
    if not best_of_cause:
        out.notes.append("no remedy finished; no combination was searched")
        return out
    current = max(best_of_cause.values(), key=lambda v: scores[v.key])
    causes, current_score = {current.cause}, scores[current.key]
    for _ in range(steps):
        searches = [V.added_search(current, v, naive, retune) for c, v in best_of_cause.items() if c not in causes]
        if not searches:
            break
        options = []
        for key, res in successive_halving(searches, ctx).results.items():
            v = V.Variant(key, f"{current.label} + {res.search.remedy.label}", "combined",
                          res.search.candidate(ctx.tree, res.best.point), res.search.overrides + res.best.point)
            out.tuning[key] = res
            out.rounds += res.rounds_trained
            options.append((v, res.search.remedy.cause))
        out.tried += [v for v, _ in options]
        step_best, cause = max(options, key=lambda o: s if (s := out.score(o[0].key)) is not None else -1.0)
        best_score = out.score(step_best.key)
        if best_score is None or current_score is None or best_score <= current_score:
            out.notes.append(f"adding a remedy of another cause to {current.label} did not raise validation "
                             f"accuracy; the search stopped there")
            break
        current, current_score = step_best, best_score
        causes.add(cause)
    return out
