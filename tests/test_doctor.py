"""The doctor end to end on a tiny real data set, its caching and resumption, and its pieces on constructed
cases (variant construction, the gap arithmetic, the diagnosis rules)."""

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import cli, tiny_args
from fedgap.config import config_to_dict, load_config
from fedgap.diagnose import combine
from fedgap.diagnose import variants as V
from fedgap.diagnose.diagnosis import _bn_settings, write_diagnosis
from fedgap.diagnose.facts import ModelFacts
from fedgap.diagnose.gap import GapRow, accuracy_at_samples, gap_rows, status
from fedgap.diagnose.tuning import SearchContext, budget_rounds, successive_halving
from fedgap.experiment.outputs import RunLock
from fedgap.runs.records import RunRecord, RunSpec

GAP_COLUMNS = ["variant", "final_test_accuracy", "gap_pp", "rounds_to_target"]


def flat(cfg):
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
    walk(config_to_dict(cfg), "")
    return out


# ----------------------------------------------------------------------------------------- variants
KERAS_BN = ModelFacts((0.01,) * 5, (1e-3,) * 5)  # a Keras model's defaults: momentum=0.99 is 0.01 in torch's terms
TORCH_BN = ModelFacts((0.1,) * 5, (1e-5,) * 5)


def test_each_remedy_changes_only_its_own_keys():
    preset = V.PRESETS["full"]
    tree = V.base_tree(preset, None, [])
    naive = V.config_from_dict(tree)
    searches, skipped = V.searches(naive, tree, preset, KERAS_BN)
    assert [s.remedy.key for s in searches] == [r.key for r in V.REMEDIES] and not skipped
    base = flat(naive)
    for s in searches:
        for point in s.grid:
            changed = {k for k, val in flat(s.candidate(tree, point)).items() if base[k] != val}
            wanted = {o.split("=")[0] for o in s.overrides + point}
            # a preset key may resolve along (nothing else may move)
            assert changed <= wanted, (s.remedy.key, changed, wanted)
        assert len(s.grid) == len({tuple(p) for p in s.grid}) >= 1


def test_every_remedy_is_tuned_over_its_own_values_and_the_full_preset_adds_the_client_lr():
    tree = V.base_tree(V.PRESETS["full"], None, [])
    naive = V.config_from_dict(tree)
    full = {s.remedy.key: s for s in V.searches(naive, tree, V.PRESETS["full"])[0]}
    quick = {s.remedy.key: s for s in V.searches(naive, tree, V.PRESETS["quick"])[0]}
    assert all(any(k.key == "client.lr" for k in s.space) for s in full.values() if s.remedy.key != "average")
    # model averaging leaves training alone: its own eta only (combined, it shares the set's client lr)
    assert [k.key for k in full["average"].space] == ["server.average"]
    assert len(full["logit_adjust"].grid) == 9 and len(quick["logit_adjust"].grid) == 3
    assert len(full["tuned"].grid) == 6 and not any("client.lr" in p for p in quick["fedbn"].grid[0])
    # FedAvgM keeps the effective step in range: server lr 0.1 with momentum 0.9 is FedAvg's step (Hsu et al.)
    assert "server.lr=0.1" in {p[0] for p in full["fedavgm"].grid}


def test_batchnorm_remedies_are_skipped_without_batchnorm_and_user_settings_win():
    preset = V.PRESETS["quick"]
    tree = V.base_tree(preset, None, ["model.norm=group", "server.rounds=7", "data.validation=0.2"])
    naive = V.config_from_dict(tree)
    assert naive.server.rounds == 7 and naive.eval.every == preset.eval_every and naive.data.validation == 0.2
    searches, skipped = V.searches(naive, tree, preset)
    keys = {s.remedy.key for s in searches}
    assert "fedbn" not in keys and any("no BatchNorm" in s for s in skipped)


def test_the_momentum_override_runs_only_where_the_running_statistics_lag():
    preset = V.PRESETS["quick"]
    tree = V.base_tree(preset, None, [])
    naive = V.config_from_dict(tree)
    lagging = {s.remedy.key: s for s in V.searches(naive, tree, preset, KERAS_BN)[0]}
    assert lagging["bn_momentum"].grid == [("model.bn_momentum=0.1",), ("model.bn_momentum=0.3",)]
    changed = flat(lagging["bn_momentum"].candidate(tree, lagging["bn_momentum"].grid[0]))
    assert {k for k, v in changed.items() if flat(naive)[k] != v} == {"model.bn_momentum"}
    searches, skipped = V.searches(naive, tree, preset, TORCH_BN)  # the default model: `make run` unchanged
    assert "bn_momentum" not in {s.remedy.key for s in searches}
    assert "BatchNorm momentum: the model's running statistics do not lag (5 BatchNorm layers, momentum 0.1, " \
           "eps 1e-05)" in skipped
    searches, skipped = V.searches(naive, tree, preset, ModelFacts())  # no BatchNorm at all
    assert not {"fedbn", "bn_momentum"} & {s.remedy.key for s in searches}


def test_the_diagnosis_names_lagging_batchnorm_settings_and_what_the_override_measured():
    naive = GapRow("naive", "naive", "", 1, 0.50, 0, 0.5, 0, 40.0, None, 0.0, None, 0, 30, 1.0, "",
                   final_val_accuracy=0.48)
    override = GapRow("bn_momentum", "BatchNorm momentum", V.NORMALIZATION, 1, 0.60, 0, 0.6, 0, 30.0, None, 0.25,
                      None, 0, 30, 1.0, "model.bn_momentum=0.1", final_val_accuracy=0.59,
                      chosen="model.bn_momentum=0.1")
    lag = _bn_settings(KERAS_BN, override, naive, tie=1.0)
    assert lag.kind == "cause" and lag.title == "BatchNorm statistics lag"
    assert "5 BatchNorm layers, momentum 0.01, eps 0.001" in lag.text and "about the last 100 batches" in lag.text
    assert "with model.bn_momentum=0.1" in lag.text and "59.00% against 48.00% (+11.00 pp; test 60.00% against " \
           "50.00%)" in lag.text
    fine = _bn_settings(TORCH_BN, None, naive, tie=1.0)
    assert fine.kind == "info" and "momentum 0.1, eps 1e-05" in fine.text and "lag" not in fine.text


def test_norm_remedies_are_skipped_for_a_model_without_norm_layers_and_remedies_it_cannot_take_too():
    preset = V.PRESETS["full"]
    tree = V.base_tree(preset, None, ["model.name=simple-cnn", "server.algorithm=fednova"])
    naive = V.config_from_dict(tree)
    searches, skipped = V.searches(naive, tree, preset)
    keys = {s.remedy.key for s in searches}
    assert not keys & {"groupnorm", "layernorm", "fedbn", "recalibrate", "adamw"}
    assert {"fedprox", "logit_adjust", "fedadam"} <= keys
    said = "\n".join(skipped)
    assert "GroupNorm: does not apply here (model.norm: simple-cnn has no norm layers, so only none applies" in said
    assert "FedBN (local BN): the model has no BatchNorm (model.norm=none)" in said
    assert "AdamW + weight decay: does not apply here (client.optimizer: server.algorithm=fednova" in said


def test_central_baseline_is_one_client_with_the_same_model_and_optimizer():
    naive = load_config(overrides=["server.algorithm=scaffold", "server.optimizer=adam", "client.lr=0.02",
                                   "model.norm_policy=local"])
    central = V.central_config(naive, 4)
    assert central.data.partition == "central" and central.data.num_clients == 1
    assert (central.server.optimizer, central.server.lr, central.client.objective) == ("sgd", 1.0, "local")
    assert central.model.norm_policy == "average" and central.server.rounds == 4
    assert (central.client.lr, central.client.optimizer, central.model.name) == (0.02, "sgd", naive.model.name)


def test_a_combination_keeps_each_remedys_tuned_values_and_the_earlier_one_wins_a_shared_key():
    tree = V.base_tree(V.PRESETS["quick"], None, [])
    la = V.Variant("logit_adjust", "LA", V.LABEL_SKEW, None,
                   ("client.objective=logit_adjust", "objective.logit_adjust.tau=2.0", "client.lr=0.1"))
    bn = V.Variant("fedbn", "FedBN", V.NORMALIZATION, None, ("model.norm_policy=local", "client.lr=0.02"))
    combo = V.combined(tree, [la, bn])
    assert combo.cfg.model.norm_policy == "local" and combo.cfg.client.objective == "logit_adjust"
    assert combo.cfg.objective.logit_adjust.tau == 2.0 and combo.cfg.client.lr == 0.1
    assert combo.key == "logit_adjust+fedbn" and combo.cause == "combined"


def test_a_combination_joins_a_loss_objective_and_a_gradient_objective():
    tree = V.base_tree(V.PRESETS["quick"], None, [])
    la = V.Variant("logit_adjust", "LA", V.LABEL_SKEW, None,
                   ("client.objective=logit_adjust", "objective.logit_adjust.tau=0.5", "client.lr=0.1"))
    dyn = V.Variant("feddyn", "FedDyn", V.DRIFT, None, ("client.objective=feddyn", "objective.feddyn.alpha=0.1"))
    combo = V.combined(tree, [la, dyn])
    assert combo.cfg.client.objective == "logit_adjust+feddyn"
    assert (combo.cfg.objective.logit_adjust.tau, combo.cfg.objective.feddyn.alpha) == (0.5, 0.1)
    assert combo.overrides[0] == "client.objective=logit_adjust+feddyn"
    # two loss objectives do not compose: the earlier (better on validation) stays alone
    rs = V.Variant("fedrs", "FedRS", V.LABEL_SKEW, None, ("client.objective=fedrs",))
    assert V.combined(tree, [la, rs]).cfg.client.objective == "logit_adjust"


# ----------------------------------------------------------------------------------------- tuning
def fake_runs(score_of):
    """A run function standing in for the pool: each run's validation curve is flat at ``score_of(cfg)``; the
    calls are recorded as [(name, rounds) per spec] per call."""
    calls = []

    def run(specs, title):
        calls.append([(s.name, s.cfg.server.rounds) for s in specs])
        recs = []
        for s in specs:
            rows = [{"round": r, "val_accuracy": score_of(s.cfg), "test_accuracy": 0.5, "samples": 10}
                    for r in range(1, s.cfg.server.rounds + 1)]
            recs.append(RunRecord(s, None, {"rounds_completed": s.cfg.server.rounds, "final_test_accuracy": 0.5,
                                            "best_test_accuracy": 0.5, "wall_seconds": 1.0}, rows))
        return recs

    return run, calls


def test_successive_halving_keeps_the_best_third_by_validation_and_extends_it():
    tree = V.base_tree(V.PRESETS["full"], None, [])
    naive = V.config_from_dict(tree)
    search = next(s for s in V.searches(naive, tree, V.PRESETS["full"])[0] if s.remedy.key == "logit_adjust")
    # validation peaks at tau 1.0, lr 0.05; grid order: tau-major
    run, calls = fake_runs(lambda c: 0.9 - abs(c.objective.logit_adjust.tau - 1.0) / 10 - abs(c.client.lr - 0.05))
    res = successive_halving([search], SearchContext(tree, (25, 75, 200), 3, 200, run)).results["logit_adjust"]
    assert [len(c) for c in calls] == [9, 3, 1] and [c[0][1] for c in calls] == [25, 75, 200]
    assert res.best.point == ("objective.logit_adjust.tau=1.0", "client.lr=0.05")
    assert res.rounds_trained == 9 * 25 + 3 * 50 + 125 == budget_rounds([search], (25, 75, 200), 3, 200)


RETUNING = dataclasses.replace(V.PRESETS["quick"], rungs=(10, 30), combine_steps=2, combine_retune=True)


def forward_selection(score, preset=RETUNING):
    """The doctor's forward selection over LA (best), FedBN and FedAdam (single-tuned at server lr 0.01), on a
    run function whose runs score ``score(cfg)`` on validation; by default as the full preset combines (every
    added remedy tuned again on top, more than one step) at quick's length. Returns (selection, calls)."""
    tree = V.base_tree(preset, None, [])
    singles = [V.Variant("logit_adjust", "LA", V.LABEL_SKEW, None, ("client.objective=logit_adjust",)),
               V.Variant("fedbn", "FedBN", V.NORMALIZATION, None, ("model.norm_policy=local",)),
               V.Variant("fedadam", "FedAdam", V.SERVER, None, ("server.optimizer=adam", "server.lr=0.01"))]
    for v in singles:
        v.cfg = V.with_overrides(tree, v.overrides)
    scores = {"logit_adjust": 0.90, "fedbn": 0.85, "fedadam": 0.80}
    run, calls = fake_runs(score)
    naive = V.config_from_dict(tree)
    ctx = SearchContext(tree, preset.rungs, preset.keep, naive.server.rounds, run)
    selection = combine.forward_selection(singles, scores, naive, ctx, preset.combine_steps, preset.combine_retune)
    assert scores == {"logit_adjust": 0.90, "fedbn": 0.85, "fedadam": 0.80}  # its inputs are left as they were
    return selection, calls


def test_forward_selection_retunes_each_added_remedy_on_top_of_the_set():
    def score(cfg):  # FedBN adds 2 pp to LA; FedAdam adds 0.5 pp at server lr 0.001, costs 1 pp at others
        adam = (0.005 if cfg.server.lr == 0.001 else -0.01) if cfg.server.optimizer == "adam" else 0.0
        return 0.90 + 0.02 * (cfg.model.norm_policy == "local") + adam

    sel, calls = forward_selection(score)
    adam = [f"logit_adjust+fedadam-{i}" for i in range(3)]
    assert [[c for c in call] for call in calls] == [
        [(n, 10) for n in adam],  # FedAdam's server lr again, on top of LA (FedBN has nothing to tune)
        [("logit_adjust+fedbn-0", 30), ("logit_adjust+fedadam-0", 30)],
        [(f"logit_adjust+fedbn+fedadam-{i}", 10) for i in range(3)],  # and again on top of LA + FedBN
        [("logit_adjust+fedbn+fedadam-0", 30)]]
    assert [v.key for v in sel.tried] == ["logit_adjust+fedbn", "logit_adjust+fedadam", "logit_adjust+fedbn+fedadam"]
    final = sel.tried[-1]
    assert sel.score(final.key) == pytest.approx(0.925) and not sel.notes
    assert (final.cfg.server.lr, final.cfg.model.norm_policy, final.cfg.client.objective) == \
        (0.001, "local", "logit_adjust")  # not the 0.01 FedAdam chose under plain cross-entropy
    assert sel.tuning[final.key].best.point == ("server.lr=0.001",)
    assert sel.rounds == 3 * 10 + 20 + 30 + 3 * 10 + 20


def test_quick_forward_selection_tries_pairs_at_each_remedys_own_tuned_values():
    def score(cfg):  # FedAdam at server lr 0.001 would help LA, but quick does not tune it again on top
        adam = (0.005 if cfg.server.lr == 0.001 else -0.01) if cfg.server.optimizer == "adam" else 0.0
        return 0.90 + 0.02 * (cfg.model.norm_policy == "local") + adam

    sel, calls = forward_selection(score, V.PRESETS["quick"])
    # one batch, both pairs straight to the full length, no third remedy
    assert calls == [[("logit_adjust+fedbn-0", 30), ("logit_adjust+fedadam-0", 30)]]
    assert [v.key for v in sel.tried] == ["logit_adjust+fedbn", "logit_adjust+fedadam"] and not sel.notes
    adam = next(v for v in sel.tried if v.key == "logit_adjust+fedadam")
    assert adam.cfg.server.lr == 0.01 and sel.tuning[adam.key].best.point == ("server.lr=0.01",)  # tuned alone
    assert sel.tuning[adam.key].searched() == "its values tuned alone, kept"
    assert sel.score("logit_adjust+fedbn") == pytest.approx(0.92) and sel.rounds == 2 * 30
    cut = V.PRESETS["quick"].cut(V.config_from_dict(V.base_tree(V.PRESETS["quick"], None, [])), 3, 1)
    assert "at most 1 remedy" in cut and "own tuned values" in cut


def test_an_added_remedy_kept_at_its_own_values_keeps_its_own_optimizer_lr():
    tree = V.base_tree(V.PRESETS["quick"], None, [])
    naive = V.config_from_dict(tree)
    la = V.Variant("logit_adjust", "LA", V.LABEL_SKEW, None, ("client.objective=logit_adjust", "client.lr=0.1"))
    adamw = V.Variant("adamw", "AdamW", V.REGULARIZATION, None,
                      V.REMEDY_BY_KEY["adamw"].overrides + ("client.lr=0.001",))
    search = V.added_search(la, adamw, naive, retune=False)
    cfg = search.candidate(tree, search.grid[0])
    assert search.grid == [("client.lr=0.001",)] and search.key == "logit_adjust+adamw"
    assert (cfg.client.optimizer, cfg.client.lr, cfg.client.objective) == ("adamw", 0.001, "logit_adjust")


def test_a_search_with_one_candidate_runs_at_the_last_rung_and_longer_runs_start_first():
    tree = V.base_tree(V.PRESETS["quick"], None, [])
    naive = V.config_from_dict(tree)
    searches = [s for s in V.searches(naive, tree, V.PRESETS["quick"])[0] if s.remedy.key in ("feddyn", "fedbn")]
    run, calls = fake_runs(lambda c: 0.9 - abs(c.objective.feddyn.alpha - 0.01))
    results = successive_halving(searches, SearchContext(tree, (9, 30), 3, 30, run)).results
    # FedBN (nothing to tune) first trains at the last rung, before FedDyn's best continues from round 9
    assert calls == [[(f"feddyn-{i}", 9) for i in range(4)], [("fedbn-0", 30), ("feddyn-2", 30)]]
    assert results["fedbn"].rounds_trained == 30 and results["feddyn"].best.point == ("objective.feddyn.alpha=0.01",)
    assert sum(r.rounds_trained for r in results.values()) == \
        budget_rounds(searches, (9, 30), 3, 30) == 30 + 4 * 9 + 21


def test_the_first_rung_carries_the_baselines_and_hands_their_records_back():
    tree = V.base_tree(V.PRESETS["quick"], None, [])
    naive = V.config_from_dict(tree)
    search = next(s for s in V.searches(naive, tree, V.PRESETS["quick"])[0] if s.remedy.key == "feddyn")
    run, calls = fake_runs(lambda c: 0.5)
    baseline = RunSpec("naive-s0", naive)
    halving = successive_halving([search], SearchContext(tree, (9, 30), 3, 30, run), also=[baseline])
    assert calls[0][0] == ("naive-s0", 30) and [r.spec for r in halving.also] == [baseline]
    assert len(calls) == 2 and all(name != "naive-s0" for name, _ in calls[1])


def test_forward_selection_adds_a_cause_only_while_validation_rises():
    def score(cfg):  # FedBN adds 2 pp to logit adjustment; FedAdam costs 1 pp whatever it joins
        return 0.90 + 0.02 * (cfg.model.norm_policy == "local") - 0.01 * (cfg.server.optimizer == "adam")

    sel, _ = forward_selection(score)
    assert [v.key for v in sel.tried] == ["logit_adjust+fedbn", "logit_adjust+fedadam", "logit_adjust+fedbn+fedadam"]
    assert sel.score("logit_adjust+fedbn") == pytest.approx(0.92) and "stopped" in sel.notes[0]


# ----------------------------------------------------------------------------------------- gap arithmetic
def record(name, accs, samples_per_round, final=None):
    rows = [{"round": i + 1, "test_accuracy": a, "samples": samples_per_round} for i, a in enumerate(accs)]
    summary = {"final_test_accuracy": accs[-1] if final is None else final, "best_test_accuracy": max(accs),
               "rounds_completed": len(accs), "wall_seconds": 1.0}
    return RunRecord(RunSpec(name, load_config()), None, summary, rows)


def test_equal_samples_accuracy_interpolates_between_central_epochs():
    central = record("c", [0.90, 0.96, 0.98], 1000)
    assert accuracy_at_samples(central, 1500) == pytest.approx(0.93)
    assert accuracy_at_samples(central, 3000) == pytest.approx(0.98)
    assert accuracy_at_samples(central, 500) is None  # before the first measurement
    assert accuracy_at_samples(central, 3001) is None  # beyond the run


def test_gap_rows_rank_and_share_closed_on_the_mean_of_the_last_three_evaluations():
    variants = [V.Variant("central", "centralized", "", None), V.Variant("naive", "naive", "", None),
                V.Variant("fedbn", "FedBN", V.NORMALIZATION, None), V.Variant("lucky", "lucky", V.SERVER, None)]
    records = {"central": [record("c", [0.90, 0.98, 0.98, 0.98], 1000)],
               "naive": [record("n", [0.50, 0.86, 0.90, 0.88], 500)],
               "fedbn": [record("b", [0.90, 0.95, 0.96, 0.97], 500)],
               "lucky": [record("l", [0.50, 0.60, 0.60, 0.99], 500)]}  # one good last evaluation
    rows = gap_rows(variants, records, "central", "naive", target=0.95)
    assert [r.variant for r in rows] == ["central", "fedbn", "naive", "lucky"]
    by = {r.variant: r for r in rows}
    assert by["naive"].final_test_accuracy == pytest.approx(0.88)  # (0.86 + 0.90 + 0.88) / 3
    assert by["naive"].last_test_accuracy == pytest.approx(0.88) and by["lucky"].last_test_accuracy == 0.99
    assert by["naive"].late_sem == pytest.approx(0.02 / 3 ** 0.5)  # sample std 0.02 over three evaluations
    assert by["naive"].gap_pp == pytest.approx(10.0)
    assert by["fedbn"].gap_pp == pytest.approx(2.0)
    assert by["fedbn"].gap_closed == pytest.approx(0.8)
    assert by["lucky"].gap_closed == pytest.approx((10.0 - 25.0) / 10.0)  # gap 0.98 - (0.6 + 0.6 + 0.99) / 3
    # 2000 samples: the centralized run has 0.98 there (after its second epoch)
    assert by["fedbn"].gap_equal_samples_pp == pytest.approx(2.0)
    assert by["fedbn"].rounds_to_target == 2 and by["naive"].rounds_to_target is None


def test_a_diverged_remedy_is_marked_as_such():
    variants = [V.Variant("central", "centralized", "", None), V.Variant("naive", "naive", "", None),
                V.Variant("scaffold", "SCAFFOLD", V.DRIFT, None)]
    blown = record("s", [0.6, 0.098], 500)
    blown.summary["diverged_at_round"] = 2
    records = {"central": [record("c", [0.95, 0.99], 1000)], "naive": [record("n", [0.5, 0.89], 500)],
               "scaffold": [blown]}
    by = {r.variant: r for r in gap_rows(variants, records, "central", "naive", target=0.95)}
    assert by["scaffold"].diverged == 1 and status(by["scaffold"]) == " (diverged)"
    assert by["naive"].diverged == 0 and status(by["naive"]) == ""


def row(variant, cause, acc, gap, closed):
    return GapRow(variant, variant, cause, 1, acc, 0.0, acc, 0.0, gap, gap, closed, None, 0, 10, 1.0, "")


def test_diagnosis_names_the_dominant_cause_only_when_the_numbers_say_so():
    central = row("central", "", 0.99, 0.0, None)
    naive = row("naive", "", 0.89, 10.0, 0.0)
    part = {"classes_per_client_mean": 3.0, "mean_tv_distance": 0.6}
    rows = [central, row("fedbn", V.NORMALIZATION, 0.98, 1.0, 0.9), row("fedprox", V.DRIFT, 0.90, 9.0, 0.1), naive]
    titles = [f.title for f in write_diagnosis(rows, [], [], part, None, 1, 0.89, "x")]
    assert "The dominant cause: normalization" in titles
    rows = [central, row("fedbn", V.NORMALIZATION, 0.95, 4.0, 0.6), row("scaffold", V.DRIFT, 0.949, 4.1, 0.59), naive]
    titles = [f.title for f in write_diagnosis(rows, [], [], part, None, 1, 0.89, "x")]
    assert "No single dominant cause" in titles
    rows = [central, row("fedbn", V.NORMALIZATION, 0.90, 9.0, 0.1), naive]
    titles = [f.title for f in write_diagnosis(rows, [], [], part, None, 1, 0.89, "x")]
    assert "No remedy closes most of the gap" in titles


def test_diagnosis_names_swings_between_rounds_from_the_naive_runs_second_half():
    central, naive = row("central", "", 0.99, 0.0, None), row("naive", "", 0.89, 10.0, 0.0)
    part = {"classes_per_client_mean": 3.0, "mean_tv_distance": 0.6}

    def swings(accs, rows=(central, naive)):
        found = write_diagnosis(list(rows), [record("n", accs, 500)], [], part, None, 1, 0.89, "x")
        return next(f for f in found if "swing" in f.title or "steady" in f.title)

    # second half 0.90, 0.86, 0.91, 0.88: steps 4, 5 and 3 pp (the first half's 30 pp jump does not count)
    swinging = swings([0.3, 0.6, 0.9, 0.90, 0.86, 0.91, 0.88])
    assert swinging.kind == "cause" and "4.00 pp on average (at most 5.00 pp)" in swinging.text
    assert "server.average" in swinging.text and "not run in this doctor run" in swinging.text
    averaged = swings([0.3, 0.6, 0.9, 0.90, 0.86, 0.91, 0.88], (central, naive, row("average", "", 0.9, 9.0, 0.1)))
    assert "server.average" in averaged.text and "not run" not in averaged.text  # the table measures it
    steady = swings([0.3, 0.6, 0.95, 0.951, 0.952, 0.953])
    assert steady.kind == "info" and steady.title == "The global model is steady between rounds"


def test_groupnorm_is_called_slower_only_against_batchnorm_after_as_many_rounds():
    from fedgap.diagnose.tuning import Trial, TuneResult

    central, naive = row("central", "", 0.99, 0.0, None), row("naive", "", 0.92, 7.0, 0.0)
    naive.final_val_accuracy = 0.92
    part = {"classes_per_client_mean": 3.0, "mean_tv_distance": 0.6}
    # the naive BatchNorm run: validation 0.50, 0.60, 0.70 by round 25 (mean 0.60), 0.92 at the end
    rows = [{"round": r, "val_accuracy": v, "test_accuracy": v, "samples": 1}
            for r, v in [(5, 0.5), (10, 0.6), (25, 0.7), (100, 0.9), (150, 0.92), (200, 0.94)]]
    naive_rec = RunRecord(RunSpec("naive", load_config()), None, {}, rows)
    search = V.Search(V.REMEDY_BY_KEY["groupnorm"], ("model.norm=group",), (V.LR,), V.grid((V.LR,)))

    def finding(scores):
        points = zip(search.grid, scores, strict=True)
        trials = [Trial(search, i, p, {25: score}) for i, (p, score) in enumerate(points)]
        tuning = {"groupnorm": TuneResult(search, trials[0], trials, 75)}
        found = write_diagnosis([central, naive], [naive_rec], [], part, None, 1, 0.9, "x", tuning=tuning)
        return next((f for f in found if "slower" in f.title), None)

    slower = finding([0.12, 0.18, 0.15])
    assert slower is not None and "After 25 rounds" in slower.text and "(60.00%)" in slower.text
    assert finding([0.12, 0.65, 0.15]) is None  # one lr beats BatchNorm at 25 rounds, though not its final 92%


def test_diagnosis_says_whether_the_combination_beat_its_best_single_remedy():
    central, naive = row("central", "", 0.99, 0.0, None), row("naive", "", 0.68, 31.0, 0.0)
    fedbn = row("fedbn", V.NORMALIZATION, 0.87, 12.0, 0.61)
    part = {"classes_per_client_mean": 3.0, "mean_tv_distance": 0.6}

    def combination(acc):
        rows = [central, fedbn, row("combined", "combined", acc, 99 - 100 * acc, None), naive]
        return next(f for f in write_diagnosis(rows, [], [], part, None, 1, 0.68, "x") if f.title == "The combination")

    worse = combination(0.51)
    assert "-36.00 pp" in worse.text and "do not add up; use fedbn alone" in worse.text and worse.kind == "caveat"
    assert "the gains add up" in combination(0.90).text
    assert "no better than" in combination(0.871).text


# ----------------------------------------------------------------------------------------- end to end
def test_doctor_writes_table_report_and_summary(doctored):
    out, done = doctored
    assert "gap to centralized training, ranked" in done.stdout and "naive" in done.stdout
    with open(out / "gap.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:4] == GAP_COLUMNS
    keys = {r["variant"] for r in rows}
    summary = json.loads((out / "summary.json").read_text())
    # every remedy of the preset ran, but the momentum override: mobilenet-like's BatchNorm (torch's 0.1) does not lag
    assert {"central", "naive", *V.PRESETS["quick"].remedies} - {"bn_momentum"} <= keys
    assert "bn_momentum" not in keys
    assert summary["model"] == {"batchnorm_layers": 5, "bn_momentum": [0.1] * 5, "bn_eps": [1e-5] * 5}
    skipped = "BatchNorm momentum: the model's running statistics do not lag"
    assert any(line.startswith(skipped) for line in summary["skipped"])
    central = next(r for r in rows if r["variant"] == "central")
    assert float(central["gap_pp"]) == 0.0
    for r in rows:  # every gap is the centralized accuracy minus the variant's, as printed
        expected = 100 * (float(central["final_test_accuracy"]) - float(r["final_test_accuracy"]))
        assert float(r["gap_pp"]) == pytest.approx(expected, abs=1e-3)
    assert summary["preset"] == "quick" and summary["preset_cut"]
    assert {v["variant"] for v in summary["variants"]} == keys
    assert summary["naive_diagnostics"]["bn_divergence"] and summary["diagnosis"]
    md = (out / "gap.md").read_text()
    assert "| # | variant | validation | test accuracy |" in md and md.count("\n| ") == len(rows) + 1
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert "http://" not in page and "https://" not in page  # self-contained, works offline
    assert "The gap" in page and "This run leaves out" in page and "recommended.yaml" in page
    # the quick preset adds remedies to the set at their own tuned values, and the report says so
    assert summary["budget"]["combination_rounds"] > 0 and summary["budget"]["combination_retune"] is False
    assert "added each remedy at the values it was tuned to alone" in page
    # the recommendation: the highest validation accuracy, written as a config `fedgap run` takes as it is
    best = max((r for r in rows if r["variant"] != "central" and r["final_val_accuracy"]),
               key=lambda r: float(r["final_val_accuracy"]))
    assert summary["recommended"]["variant"] == best["variant"]
    rec = load_config(out / "recommended.yaml")
    assert rec.data.validation == 0.1 and rec.server.rounds == 2
    assert all(f"{k}" in (out / "recommended.yaml").read_text() for k in ("changes against your setting",))


def test_the_recommendation_never_reads_test_labels(doctored, tiny_idx, tmp_path):
    """The same doctor with the test labels replaced by noise recommends the same configuration, byte for
    byte (but the comment lines, which report test numbers)."""
    import shutil

    import numpy as np

    from conftest import idx_bytes

    out, _ = doctored
    noisy = tmp_path / "noisy"
    shutil.copytree(tiny_idx, noisy)
    labels = np.random.default_rng(7).integers(0, 10, 200).astype("uint8")
    (noisy / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    args = tiny_args(str(noisy))
    done = subprocess.run([sys.executable, "-m", "fedgap", "doctor", *args, "--out", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    def config_lines(path):
        return [ln for ln in path.read_text().splitlines() if not ln.startswith("#") and "root" not in ln]

    assert config_lines(tmp_path / "d" / "recommended.yaml") == config_lines(out / "recommended.yaml")
    first = json.loads((out / "summary.json").read_text())
    second = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert first["tuning"] == second["tuning"]  # every candidate's validation scores, unchanged
    assert [v["final_test_accuracy"] for v in first["variants"]] != [v["final_test_accuracy"]
                                                                       for v in second["variants"]]


def test_a_second_doctor_reuses_every_run(doctored, tiny_idx):
    out, _ = doctored
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    t0 = time.monotonic()
    again = subprocess.run([sys.executable, "-m", "fedgap", "doctor", *tiny_args(tiny_idx), "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")} == stamps
    assert time.monotonic() - t0 < 60
    # the report says the runs were reused and how long they took then, not just this call's seconds
    header = (out / "gap.md").read_text().splitlines()[0]
    assert f"{len(stamps)} runs" in header and "all reused from the cache" in header


def test_killed_doctor_resumes_without_redoing_finished_runs(tiny_idx, tmp_path):
    out = tmp_path / "d"
    args = [sys.executable, "-m", "fedgap", "doctor", *tiny_args(tiny_idx), "server.rounds=4", "--out", str(out),
            "--remedies", "fedbn,fedrs"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while len(list(out.glob("runs/*/summary.json"))) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    time.sleep(1.0)  # the workers die with the doctor: every run folder can be locked again
    for run in out.glob("runs/*"):
        RunLock(run).release()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    assert not (out / "report.html").exists()
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert (out / "report.html").exists()


def test_doctor_rejects_a_central_partition_no_validation_and_unknown_remedies(capsys):
    code, _, err = cli("doctor", "data.partition=central", "--out", "/tmp/never", capsys=capsys)
    assert code == 2 and "data.partition" in err and "Traceback" not in err
    code, _, err = cli("doctor", "data.validation=0", "--out", "/tmp/never", capsys=capsys)
    assert code == 2 and "data.validation: the doctor chooses" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("doctor", "--remedies", "fedbn,magic", "--out", "/tmp/never", capsys=capsys)
    assert code == 2 and "--remedies: unknown magic" in err


def _flood(q, n):
    for i in range(n):
        q.put(("run", i, n, 0.5))


def test_progress_is_drained_without_a_display_so_workers_can_exit():
    """A doctor without a terminal hung after its 13 full-preset runs: nobody read the progress queue, it filled
    the pipe, and the workers' queue feeders blocked their exit. Now the display drains it in every mode."""
    import multiprocessing as mp

    from fedgap.runs.display import Display

    ctx = mp.get_context("fork")  # spawn would leave a resource-tracker child that other tests count as a leak
    q = ctx.Queue()
    display = Display("t", total=1, done=0, enabled=False)
    display.follow(q)
    worker = ctx.Process(target=_flood, args=(q, 5000))  # ~500 KB of messages, far more than a pipe holds
    worker.start()
    worker.join(timeout=60)
    display.close()
    if worker.exitcode is None:
        worker.kill()
    assert worker.exitcode == 0
