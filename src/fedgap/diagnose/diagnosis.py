"""The doctor's written diagnosis: short findings, each built only from numbers measured in this doctor run.

Rules that keep it honest: a cause is named as dominant only when its remedies closed the largest share of the
gap and at least half of it; differences smaller than the noise (twice the seed-to-seed standard deviation, or
1 pp when only one seed ran) are called ties, not wins; a diagnostic is reported with the value it had,
averaged over the naive run's last evaluations so one noisy round does not decide.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fedgap.diagnose.facts import ModelFacts
from fedgap.diagnose.gap import GapRow, evaluation_noise_pp
from fedgap.diagnose.variants import CAUSES
from fedgap.runs.records import RunRecord
from fedgap.runs.scores import LATE_EVALS, evaluated, late_mean, validation_score

ONE_SEED_NOISE_PP = 1.0  # assumed resolution with a single seed (say so in the text)


@dataclass
class Finding:
    title: str
    text: str
    kind: str = "info"  # info | cause | remedy | caveat

    def as_dict(self) -> dict:
        return asdict(self)


def seeds_late_mean(records: list[RunRecord], key: str) -> float | None:
    """Mean over seeds of the late mean (last LATE_EVALS evaluated values) of ``key``."""
    per_seed = [m for m in (late_mean(evaluated(rec, key)) for rec in records) if m is not None]
    return float(np.mean(per_seed)) if per_seed else None


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def write_diagnosis(rows: list[GapRow], naive_recs: list[RunRecord], central_recs: list[RunRecord],
                    partition: dict, noise: float | None, seeds: int, target: float,
                    target_source: str, recommended: str | None = None, tuning: dict | None = None,
                    facts: ModelFacts | None = None) -> list[Finding]:
    by = {r.variant: r for r in rows}
    central, naive = by.get("central"), by.get("naive")
    out: list[Finding] = []
    if central is None or naive is None or central.final_test_accuracy is None or naive.final_test_accuracy is None:
        return [Finding("No diagnosis", "the centralized or the naive run did not finish; see the table", "caveat")]
    tie = 2 * noise if noise is not None else ONE_SEED_NOISE_PP
    swing = evaluation_noise_pp(rows)
    gap = naive.gap_pp or 0.0

    equal = ""
    if naive.gap_equal_samples_pp is not None:
        equal = (f"; against centralized training on the same number of training samples the gap is "
                 f"{naive.gap_equal_samples_pp:.2f} pp")
    out.append(Finding("The gap", (
        f"Centralized training of the same model reaches {pct(central.final_test_accuracy)} after "
        f"{central.rounds} epochs. The naive federated run reaches {pct(naive.final_test_accuracy)} after "
        f"{naive.rounds} rounds: {gap:.2f} pp below{equal}. Accuracies here are means of each run's last "
        f"{LATE_EVALS} evaluations (naive: last evaluation {pct(naive.last_test_accuracy or 0)})."), "info"))
    if gap <= tie:
        out.append(Finding("No meaningful gap", (
            f"The naive gap ({gap:.2f} pp) is within the noise ({tie:.2f} pp): there is little to fix in this "
            f"setting."), "caveat"))

    train_mode = seeds_late_mean(naive_recs, "train_mode_accuracy")
    eval_mode = seeds_late_mean(naive_recs, "test_accuracy")
    if train_mode is not None and eval_mode is not None:
        diff = 100 * (train_mode - eval_mode)
        running = seeds_late_mean(naive_recs, "bn_running_error")
        spread = seeds_late_mean(naive_recs, "bn_client_spread")
        split = ""
        if running is not None and spread is not None:
            split = (f" Their distance to the clients' statistics splits into {running:.3f} between the running "
                     f"statistics and the pooled client data (what recalibration removes) and {spread:.3f} "
                     f"between single clients and the pool (label skew), in standard deviations.")
        if diff > tie:
            text = (f"Normalizing each test batch by its own statistics, the naive global model scores "
                    f"{pct(train_mode)} instead of {pct(eval_mode)} (+{diff:.2f} pp, last {LATE_EVALS} evaluations): "
                    f"its weights are better than its BatchNorm running statistics.{split}")
            out.append(Finding("BatchNorm statistics are wrong", text, "cause"))
        else:
            text = (f"With test-batch statistics the naive global model scores {pct(train_mode)} against "
                    f"{pct(eval_mode)} with its running statistics ({diff:+.2f} pp, within {tie:.2f} pp; means of "
                    f"the last {LATE_EVALS} evaluations): the running statistics are not what holds it back.{split}")
            out.append(Finding("BatchNorm statistics are fine", text, "info"))

    if facts is not None and facts.has_batchnorm:
        out.append(_bn_settings(facts, by.get("bn_momentum"), naive, tie))

    drift = seeds_late_mean(naive_recs, "client_drift")
    cosine = seeds_late_mean(naive_recs, "update_cosine")
    if drift is not None:
        agree = "more than they agree" if drift > 1 else "less than they agree"
        out.append(Finding("Client drift", (
            f"The clients' updates spread {drift:.2f} times the length of their mean update around it (mean cosine "
            f"to the mean {cosine:.2f}): the clients disagree {agree}."), "info"))

    acc_std, acc_min, acc_max = (seeds_late_mean(naive_recs, k) for k in ("client_acc_std", "client_acc_min",
                                                                      "client_acc_max"))
    hetero = (f"The partition gives each client {partition['classes_per_client_mean']:.1f} labels on average; the "
              f"mean total-variation distance between a client's label mix and the global one is "
              f"{partition['mean_tv_distance']:.2f} (0 = IID, 1 = disjoint).")
    if acc_std is not None:
        hetero += (f" On test sets drawn with each sampled client's label mix, the global model's accuracy ranges "
                   f"from {pct(acc_min)} to {pct(acc_max)} (standard deviation {100 * acc_std:.1f} pp).")
    out.append(Finding("Label heterogeneity", hetero, "info"))

    for finding in (_classifier_bias(naive_recs), _swings(naive_recs, averaged="average" in by)):
        if finding is not None:
            out.append(finding)
    out += _remedy_findings(rows, naive, gap, tie, recommended)
    out += _tuning_findings(rows, naive, naive_recs, tuning or {})
    if seeds == 1:
        out.append(Finding("One seed", (
            f"Every variant ran with one seed, so differences below about {ONE_SEED_NOISE_PP:.0f} pp are not "
            f"resolved, and more where the runs swing: the typical standard error of a run's final accuracy (the "
            f"mean of its last {LATE_EVALS} evaluations) is {swing if swing is not None else 0:.1f} pp here. "
            f"`--seeds 3` gives means and standard deviations."), "caveat"))
    out.append(Finding("Rounds to target", (
        f"Rounds to target count the rounds until a variant first reaches {pct(target)} ({target_source})."),
        "info"))
    return out


def _bn_settings(facts: ModelFacts, override: GapRow | None, naive: GapRow, tie: float) -> Finding:
    """The model's BatchNorm momentum and eps (a framework's defaults: Keras' momentum=0.99 is 0.01 in torch's
    convention), whether its running statistics lag, and what a momentum override measured against them."""
    text = (f"The model has {facts.describe()} (momentum in torch's convention, the weight of each new batch in "
            f"the running statistics: torch's default is 0.1; Keras' default momentum=0.99 is 0.01 here).")
    if not facts.lagging_bn:
        return Finding("BatchNorm settings", text, "info")
    slowest = min((m for m in facts.bn_momenta if m is not None), default=None)
    text += (" Its running statistics average over about the last "
             + (f"{1 / slowest:.0f} batches" if slowest else "all batches") + ", while the global model changes "
             "every round: the statistics it is evaluated with lag behind its weights.")
    if override is None or override.final_val_accuracy is None or naive.final_val_accuracy is None:
        return Finding("BatchNorm statistics lag", text + " No momentum override finished in this doctor run.",
                       "info")
    gain = 100 * (override.final_val_accuracy - naive.final_val_accuracy)
    test = ("" if override.final_test_accuracy is None or naive.final_test_accuracy is None else
            f"; test {pct(override.final_test_accuracy)} against {pct(naive.final_test_accuracy)}")
    text += (f" Measured here: with {override.chosen or 'the override'} (everything else as the naive run; only "
             f"evaluation changes) validation accuracy is {pct(override.final_val_accuracy)} against "
             f"{pct(naive.final_val_accuracy)} ({gain:+.2f} pp{test}).")
    return Finding("BatchNorm statistics lag" if gain > tie else "BatchNorm momentum does not matter here", text,
                   "cause" if gain > tie else "info")


def _classifier_bias(naive_recs: list[RunRecord]) -> Finding | None:
    """Whether the classifier drifts toward the classes of each round's clients (the label-skew cause)."""
    lean = seeds_late_mean(naive_recs, "prediction_lean")
    low, high = seeds_late_mean(naive_recs, "class_recall_min"), seeds_late_mean(naive_recs, "class_recall_max")
    if lean is None or low is None:
        return None
    more = f"{100 * lean:.1f}% more" if lean >= 0 else f"{-100 * lean:.1f}% less"
    text = (f"The naive global model's per-class recall ranges from {pct(low)} to {pct(high)}, and its predictions "
            f"put {more} weight on the label mix of the last round's clients than the true test labels do (means "
            f"of the last {LATE_EVALS} evaluations).")
    if lean > 0.05 or high - low > 0.2:
        return Finding("The classifier leans toward each round's clients", text + (
            " After a round the model predicts what the round's few clients held: the classifier drifts with "
            "the label skew, which is what logit adjustment, FedLC and FedRS correct."), "cause")
    return Finding("The classifier does not lean", text, "info")


def _swings(naive_recs: list[RunRecord], averaged: bool) -> Finding | None:
    """How far the naive global model moves between successive evaluations late in its run: the part of the gap
    that depends on which clients the last rounds happened to sample (what model averaging treats)."""
    steps = []
    for rec in naive_recs:
        accs = [float(r["test_accuracy"]) for r in rec.rows if r.get("test_accuracy") is not None]
        late = accs[len(accs) // 2:]
        steps += [abs(b - a) for a, b in zip(late[:-1], late[1:], strict=True)]
    if len(steps) < 2:
        return None
    mean, worst = 100 * float(np.mean(steps)), 100 * max(steps)
    text = (f"Over the second half of the naive run, successive evaluations of the global model differ by "
            f"{mean:.2f} pp on average (at most {worst:.2f} pp).")
    if mean >= ONE_SEED_NOISE_PP:
        return Finding("The global model swings from round to round", text + (
            " Each round's few clients pull it toward their own labels, so the model a run ends with depends on "
            "which clients its last rounds sampled; averaging the round models (server.average) is the remedy "
            "that targets it" + ("." if averaged else ", not run in this doctor run (`--remedies average`, or the "
                                 "full preset, measures it).")), "cause")
    return Finding("The global model is steady between rounds", text, "info")


def _tuning_findings(rows: list[GapRow], naive: GapRow, naive_recs: list[RunRecord],
                     tuning: dict) -> list[Finding]:
    out: list[Finding] = []
    tuned = next((r for r in rows if r.variant == "tuned" and r.final_test_accuracy is not None), None)
    if tuned is not None and naive.final_test_accuracy is not None:
        out.append(Finding("Tuning alone", (
            f"The user's setting with only the client lr and momentum tuned ({tuned.chosen or 'unchanged'}) reaches "
            f"{pct(tuned.final_test_accuracy)} against {pct(naive.final_test_accuracy)} "
            f"({100 * (tuned.final_test_accuracy - naive.final_test_accuracy):+.2f} pp)."), "info"))
    for key in ("groupnorm", "layernorm"):
        res = tuning.get(key)
        if res is None or not naive_recs or not any(k.key == "client.lr" for k in res.search.space):
            continue
        first = min((rounds for t in res.trials for rounds in t.scores), default=None)
        base = validation_score(naive_recs[0], first) if first is not None else None  # BatchNorm, as many rounds
        by_lr = [(t.point, t.scores.get(first)) for t in res.trials]
        if base is None or not by_lr:
            continue
        if all(score is not None and score < base for _, score in by_lr):
            out.append(Finding(f"{res.search.remedy.label} is slower here at every lr tried", (
                f"After {first} rounds, at every client lr tried ({res.searched()}), it scored below the naive "
                f"BatchNorm run's validation accuracy after as many rounds ({pct(base)}): " + ", ".join(
                    f"{' '.join(p)}: {pct(score)}" for p, score in by_lr) + ". Under this label skew it converges "
                "more slowly than BatchNorm; it is not only mis-tuned."), "info"))
    return out


def _remedy_findings(rows: list[GapRow], naive: GapRow, gap: float, tie: float,
                     recommended: str | None = None) -> list[Finding]:
    out: list[Finding] = []
    remedies = [r for r in rows if r.cause in CAUSES and r.final_test_accuracy is not None]
    if not remedies or gap <= 0:
        return out
    best_by_cause = {}  # the best remedy of each cause as the doctor selects: by validation accuracy
    for r in remedies:
        if r.cause not in best_by_cause or r.selection_score() > best_by_cause[r.cause].selection_score():
            best_by_cause[r.cause] = r
    parts = []
    for cause in CAUSES:
        r = best_by_cause.get(cause)
        if r is not None and r.gap_closed is not None:
            parts.append(f"{cause}: {r.label} closes {100 * r.gap_closed:.0f}% ({pct(r.final_test_accuracy)})")
    out.append(Finding("What each kind of remedy closes", "; ".join(parts) + ".", "remedy"))

    ranked = sorted(best_by_cause.values(), key=lambda r: -(r.gap_closed or -1e9))
    top = ranked[0]
    if top.gap_closed is not None and top.gap_closed >= 0.5 and \
            (len(ranked) == 1 or (top.gap_closed - (ranked[1].gap_closed or 0)) * gap > tie):
        out.append(Finding(f"The dominant cause: {top.cause}", (
            f"{top.label} alone closes {100 * top.gap_closed:.0f}% of the {gap:.2f} pp gap, more than the best "
            f"remedy of any other kind."), "cause"))
    elif top.gap_closed is not None and top.gap_closed >= 0.5:
        tied = [r for r in ranked if (top.gap_closed - (r.gap_closed or 0)) * gap <= tie]
        out.append(Finding("No single dominant cause", (
            "Remedies of different kinds close similar shares of the gap: "
            + ", ".join(f"{r.label} ({100 * r.gap_closed:.0f}%)" for r in tied) + "."), "cause"))
    else:
        out.append(Finding("No remedy closes most of the gap", (
            f"The best single remedy, {top.label}, closes {100 * (top.gap_closed or 0):.0f}%. What remains may be "
            f"too few rounds or too little data per client."), "cause"))

    everything = [r for r in rows if r.variant not in ("central", "naive") and r.final_test_accuracy is not None]
    best = next((r for r in everything if r.variant == recommended), None) or \
        max(everything, key=GapRow.selection_score)
    text = (f"{best.label}: {pct(best.final_test_accuracy)} on the test set, {best.gap_pp:.2f} pp below centralized "
            f"training, {100 * (best.gap_closed or 0):.0f}% of the naive gap closed; chosen as the highest validation "
            f"accuracy ({pct(best.final_val_accuracy or 0)}) of every variant, never by its test accuracy.")
    if best.changes:
        text += f" It changes: `{best.changes}`; recommended.yaml holds the whole configuration."
    out.append(Finding("What to use", text, "remedy"))

    combination = _combination_finding(rows, remedies, tie)
    if combination is not None:
        out.append(combination)

    hurt = [r for r in remedies if 100 * (naive.final_test_accuracy - r.final_test_accuracy) > tie]
    if hurt:
        out.append(Finding("Remedies that hurt here", ", ".join(
            f"{r.label} ({pct(r.final_test_accuracy)}, {100 * (r.final_test_accuracy - naive.final_test_accuracy):+.2f}"
            f" pp)" for r in hurt) + " do worse than the naive run in this setting (with these hyper-parameters).",
            "caveat"))
    return out


def _combination_finding(rows: list[GapRow], remedies: list[GapRow], tie: float) -> Finding | None:
    """Whether the best combination (by validation) beat its best single remedy: do the gains add up?"""
    combos = [r for r in rows if r.cause == "combined" and r.final_test_accuracy is not None]
    if not combos or not remedies:
        return None
    combined = max(combos, key=GapRow.selection_score)
    single = max(remedies, key=GapRow.selection_score)
    diff = 100 * (combined.selection_score() - single.selection_score())  # the verdict is a choice: validation
    test_diff = 100 * (combined.final_test_accuracy - single.final_test_accuracy)
    if diff > tie:
        verdict, kind = "the gains add up", "remedy"
    elif diff < -tie:
        verdict, kind = f"the gains do not add up; use {single.label} alone", "caveat"
    else:
        verdict, kind = "no better than the best single remedy, within the noise", "info"
    return Finding("The combination", (
        f"{combined.label} (found by greedy forward selection on validation accuracy) scored {diff:+.2f} pp on "
        f"validation against the best single remedy, {single.label}: {verdict}. On the test set: "
        f"{pct(combined.final_test_accuracy)} against {pct(single.final_test_accuracy)} ({test_diff:+.2f} pp)."), kind)
