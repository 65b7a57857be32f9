"""What the doctor runs: the centralized baseline, the naive federated run (the user's setting as given), a
tuned-FedAvg row (what tuning alone gives), each remedy at its own best hyper-parameters, and the combination
found by greedy forward selection, all selected on a validation split.

A remedy is a set of config overrides applied on top of the user's setting (the naive run), so it changes one
thing: the client objective, the server optimizer, the norm layer or policy, a schedule or a client regularizer;
plus its search space (``knobs``: its own hyper-parameters, and in the full preset the client lr). Overrides
name the components explicitly (``client.objective=prox`` rather than ``server.algorithm=fedprox``) so that a
remedy means the same whatever preset the user started from. Remedies are grouped by the cause of the gap
they address; the diagnosis compares the groups and the combination joins remedies of different causes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from fedgap.config import Config, config_from_dict, config_to_dict, merge, parse_overrides, read_yaml, results_hash
from fedgap.diagnose.facts import ModelFacts
from fedgap.errors import ConfigError
from fedgap.fl.objectives import objective_spec

# cause groups, in the order the report lists them
NORMALIZATION, DRIFT, LABEL_SKEW = "normalization", "client drift", "label skew (classifier)"
SERVER, REGULARIZATION = "server optimizer and schedules", "regularization"
SWINGS = "swings between rounds"  # each round's few clients pull the global model toward their labels
CAUSES = (NORMALIZATION, DRIFT, LABEL_SKEW, SWINGS, SERVER, REGULARIZATION)
TUNING = "tuning alone"


@dataclass(frozen=True)
class Knob:
    """One hyper-parameter of a search space: a dotted config key and the values tried."""

    key: str
    values: tuple

    def describe(self) -> str:
        return f"{self.key} in {{{', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in self.values)}}}"


LR = Knob("client.lr", (0.02, 0.05, 0.1))  # the client lr every SGD remedy is tuned over (full preset)


@dataclass(frozen=True)
class Remedy:
    key: str
    label: str
    cause: str
    overrides: tuple[str, ...]
    knobs: tuple[Knob, ...] = ()  # the remedy's own hyper-parameters
    needs_batchnorm: bool = False  # only meaningful when the naive model has BatchNorm
    needs_lagging_bn: bool = False  # only meaningful when its running statistics lag (momentum below torch's 0.1)
    # the full preset also searches the client lr (False: its knobs hold the lr, as tuned FedAvg's and AdamW's do,
    # or it leaves training alone and shares the lr of what it is added to, as model averaging does)
    search_lr: bool = True
    why: str = ""


REMEDIES: tuple[Remedy, ...] = (
    Remedy("tuned", "tuned FedAvg", TUNING, (), (Knob("client.lr", (0.02, 0.05, 0.1)),
                                                  Knob("client.momentum", (0.0, 0.9))), search_lr=False,
           why="the user's setting with only the client lr and momentum tuned: what tuning alone gives"),
    Remedy("groupnorm", "GroupNorm", NORMALIZATION, ("model.norm=group",),
           why="per-sample statistics: nothing to average, nothing skewed"),
    Remedy("layernorm", "LayerNorm", NORMALIZATION, ("model.norm=layer",),
           why="per-sample statistics over all channels"),
    Remedy("fedbn", "FedBN (local BN)", NORMALIZATION, ("model.norm_policy=local",), needs_batchnorm=True,
           why="each client keeps its own BatchNorm layers (Li et al. 2021)"),
    Remedy("recalibrate", "BN recalibration", NORMALIZATION, ("model.norm_policy=recalibrate",),
           needs_batchnorm=True, why="exact federated BatchNorm statistics of the global model"),
    Remedy("bn_momentum", "BatchNorm momentum", NORMALIZATION, (), (Knob("model.bn_momentum", (0.1, 0.3)),),
           needs_batchnorm=True, needs_lagging_bn=True, search_lr=False,
           why="running statistics that keep up with the model: momentum 0.1 or 0.3 in torch's convention (the "
               "weight of each new batch) instead of a lagging one such as Keras' default momentum=0.99 (0.01 "
               "here); only evaluation changes, training is the same"),
    Remedy("fedprox", "FedProx", DRIFT, ("client.objective=prox",), (Knob("server.mu", (0.001, 0.01, 0.1)),),
           why="proximal term mu/2 ||w - w_global||^2 (Li et al. 2020)"),
    Remedy("scaffold", "SCAFFOLD", DRIFT, ("client.objective=scaffold",),
           why="control variates correct the client gradients (Karimireddy et al. 2020)"),
    Remedy("feddyn", "FedDyn", DRIFT, ("client.objective=feddyn",),
           (Knob("objective.feddyn.alpha", (0.001, 0.003, 0.01, 0.1)),),
           why="dynamic regularization aligns local and global stationary points (Acar et al. 2021)"),
    Remedy("logit_adjust", "logit adjustment", LABEL_SKEW, ("client.objective=logit_adjust",),
           (Knob("objective.logit_adjust.tau", (0.5, 1.0, 2.0)),),
           why="logits + tau log p_client(y) in local training (balanced softmax; Menon et al. 2021)"),
    Remedy("fedlc", "FedLC", LABEL_SKEW, ("client.objective=fedlc",), (Knob("objective.fedlc.tau", (0.1, 0.5, 1.0)),),
           why="logit calibration by the client's label counts (Zhang et al. 2022)"),
    Remedy("fedrs", "FedRS", LABEL_SKEW, ("client.objective=fedrs",), (Knob("objective.fedrs.alpha", (0.1, 0.5, 0.9)),),
           why="restricted softmax: missing classes' logits scaled down (Li & Zhan 2021)"),
    Remedy("average", "model averaging", SWINGS, (), (Knob("server.average", (1.0, 3.0, 9.0)),), search_lr=False,
           why="the server evaluates a polynomial-decay average of the round models, about the last 1/(eta+1) of "
               "the rounds so far (Shamir & Zhang 2013; server-side SWA, Caldarola et al. 2022); training is "
               "unchanged"),
    Remedy("fedavgm", "FedAvgM", SERVER, ("server.optimizer=momentum", "server.momentum=0.9"),
           (Knob("server.lr", (0.1, 0.3, 1.0)),),
           why="server momentum on the mean update (Hsu et al. 2019; server lr 0.1 keeps FedAvg's step)"),
    Remedy("fedadam", "FedAdam", SERVER, ("server.optimizer=adam",), (Knob("server.lr", (0.001, 0.003, 0.01)),),
           why="server Adam on the mean update (Reddi et al. 2021)"),
    Remedy("fedyogi", "FedYogi", SERVER, ("server.optimizer=yogi",), (Knob("server.lr", (0.001, 0.003, 0.01)),),
           why="server Yogi on the mean update (Reddi et al. 2021)"),
    Remedy("lr_decay", "client lr decay", SERVER, (), (Knob("client.lr_decay", (0.98, 0.99, 0.995)),),
           why="the client lr shrinks geometrically over rounds, damping late oscillation"),
    Remedy("adamw", "AdamW + weight decay", REGULARIZATION, ("client.optimizer=adamw", "client.weight_decay=0.01"),
           (Knob("client.lr", (0.0003, 0.001, 0.003)),), search_lr=False,
           why="decoupled weight decay on the clients (Loshchilov & Hutter 2019)"),
    Remedy("augment", "augmentation", REGULARIZATION, ("client.augment=true",),
           why="random shifts and rotations of client batches"),
)
REMEDY_BY_KEY = {r.key: r for r in REMEDIES}


@dataclass(frozen=True)
class DoctorPreset:
    name: str
    rounds: int
    eval_every: int
    central_epochs: int  # at least; raised to cover the naive run's training samples
    remedies: tuple[str, ...]
    rungs: tuple[int, ...]  # successive halving: rounds at which candidates are compared (the last = rounds)
    keep: int = 3  # reduction factor: a rung keeps the best 1/keep of its candidates (at least one)
    tune_lr: bool = False  # also search the client lr (LR) for every remedy without its own
    combine_steps: int = 3  # greedy forward selection: at most this many additions
    combine_retune: bool = True  # an added remedy's knobs tuned again on top of the set (False: its own tuned values)
    validation: float = 0.1  # data.validation when the user gives none

    def cut(self, naive: Config, central_epochs: int, seeds: int) -> str:
        """What this run leaves out against the full preset, from the settings actually used ('' if nothing)."""
        full = PRESETS["full"]
        parts = []
        if naive.server.rounds < full.rounds:
            parts.append(f"{naive.server.rounds} rounds instead of {full.rounds} (the federated runs may not "
                         f"have converged)")
        if naive.eval.every > full.eval_every:
            parts.append(f"evaluation every {naive.eval.every} rounds")
        if central_epochs < full.central_epochs:
            parts.append(f"the centralized baseline trained for {central_epochs} epochs (as many samples as the "
                         f"naive run) instead of {full.central_epochs} (to convergence)")
        left_out = [REMEDY_BY_KEY[k].label for k in full.remedies if k not in self.remedies]
        if left_out:
            parts.append(f"{', '.join(left_out)} left out")
        if not self.tune_lr and full.tune_lr:
            parts.append("remedies tuned over their own hyper-parameters only (the full preset adds the client lr)")
        if self.combine_steps < full.combine_steps:
            parts.append(f"the combination adds at most {self.combine_steps} remedy to the best one "
                         f"(full: {full.combine_steps})")
        if not self.combine_retune and full.combine_retune:
            parts.append("an added remedy keeps its own tuned values (the full preset tunes them again on top)")
        if seeds == 1:
            parts.append("one seed")
        return ", ".join(parts)

    def space(self, remedy: Remedy) -> tuple[Knob, ...]:
        lr = (LR,) if self.tune_lr and remedy.search_lr else ()
        return remedy.knobs + lr


PRESETS = {
    "quick": DoctorPreset(
        "quick", rounds=30, eval_every=3, central_epochs=3, rungs=(9, 30), combine_steps=1, combine_retune=False,
        # the remedy of each cause that the full preset found to matter, within 10 minutes on 2 cores with the
        # combination search (FedLC and FedRS trailed logit adjustment, 70-72% against 88% at 30 rounds;
        # FedAdam closed 22% alone and lowered every set it joined; model averaging added 0.07 pp of validation
        # to logit adjustment + FedDyn at 30 rounds and took make run to 11.9 minutes; all stay in the full preset).
        # The first rung is an evaluation round (9 with evaluation every 3: no round trained unseen). The
        # combination is one step of pairs at the partners' own values: with FedDyn's alpha tuned again on top
        # and a third remedy tried, make run took 9.3 and 11.0 minutes on the same day (2026-12-05), and the
        # third remedy lowered validation accuracy both times.
        # The momentum override runs only for a model whose BatchNorm statistics lag (a Keras model's default).
        remedies=("tuned", "fedbn", "logit_adjust", "feddyn", "bn_momentum"),
    ),
    "full": DoctorPreset("full", rounds=200, eval_every=5, central_epochs=15, rungs=(25, 75, 200), tune_lr=True,
                         remedies=tuple(r.key for r in REMEDIES)),
}


def grid(knobs: tuple[Knob, ...]) -> list[tuple[str, ...]]:
    """Every combination of the knobs' values, as override tuples (one empty tuple without knobs)."""
    return [tuple(f"{k.key}={v}" for k, v in zip(knobs, values, strict=True))
            for values in itertools.product(*(k.values for k in knobs))]


@dataclass
class Variant:
    key: str  # file-name safe id: "naive", "central", "fedprox", "combined"
    label: str
    cause: str  # "" for naive and central
    cfg: Config
    overrides: tuple[str, ...] = ()  # what it changes against the naive run


def base_tree(preset: DoctorPreset, config_path: str | None, overrides: list[str]) -> dict:
    """The naive run's config tree: the preset's rounds and evaluation, then the user's YAML and overrides
    (the user's settings win). The validation split is the preset's unless the user gives one."""
    tree = parse_overrides([f"server.rounds={preset.rounds}", f"eval.every={preset.eval_every}",
                            f"data.validation={preset.validation}"])
    if config_path:
        tree = merge(tree, read_yaml(config_path))
    return merge(tree, parse_overrides(overrides))


def with_overrides(tree: dict, overrides: tuple[str, ...] | list[str]) -> Config:
    return config_from_dict(merge(tree, parse_overrides(list(overrides))))


def remedy_overrides(naive: Config, remedy: Remedy) -> tuple[str, ...]:
    extra: tuple[str, ...] = ()
    if remedy.cause == NORMALIZATION and remedy.key in ("groupnorm", "layernorm") and \
            naive.model.norm_policy == "recalibrate":
        extra = ("model.norm_policy=average",)  # recalibration needs BatchNorm; drop it with the BN layers
    return remedy.overrides + extra


def central_config(naive: Config, epochs: int) -> Config:
    """The same model and client optimizer trained on all the data in one place: one client, server SGD with
    lr 1 (the server step is then the identity), plain local loss, BatchNorm as torch does it."""
    tree = config_to_dict(naive)
    tree["data"]["partition"] = "central"
    tree["server"].update(algorithm="fedavg", optimizer="sgd", lr=1.0, momentum=0.0, rounds=epochs)
    tree["client"].update(objective="local", epochs=1)
    tree["model"]["norm_policy"] = "average"
    tree["eval"]["every"] = 1
    tree["eval"]["stop_at_target"] = False
    return config_from_dict(tree)


def joined_objective(a: str, b: str) -> str | None:
    """The two client objectives joined, or None where they do not compose (two loss objectives, ...)."""
    try:
        return objective_spec(f"{a}+{b}")
    except ValueError:
        return None


@dataclass
class Search:
    """A remedy's search: its base overrides and the grid of hyper-parameter overrides tried on top."""

    remedy: Remedy
    overrides: tuple[str, ...]
    space: tuple[Knob, ...]
    grid: list[tuple[str, ...]]
    name: str = ""  # the runs' name ("logit_adjust+fedadam" when the remedy is added to a set); default remedy.key

    @property
    def key(self) -> str:
        return self.name or self.remedy.key

    def candidate(self, tree: dict, point: tuple[str, ...]) -> Config:
        return with_overrides(tree, self.overrides + point)


def searches(naive: Config, tree: dict, preset: DoctorPreset,
             facts: ModelFacts | None = None) -> tuple[list[Search], list[str]]:
    """Each remedy of the preset with its search space, skipping those that do not apply (to the naive model as
    ``facts`` describe it; without facts, a model has BatchNorm unless model.norm says otherwise) or equal the
    naive run. Returns the searches and one line per skipped remedy (said in the report)."""
    naive_hash = results_hash(naive)
    has_bn = facts.has_batchnorm if facts is not None else naive.model.norm == "batch"
    out, skipped = [], []
    for key in preset.remedies:
        remedy = REMEDY_BY_KEY[key]
        if remedy.needs_batchnorm and not has_bn:
            skipped.append(f"{remedy.label}: the model has no BatchNorm (model.norm={naive.model.norm})")
            continue
        if remedy.needs_lagging_bn and not (facts is not None and facts.lagging_bn):
            skipped.append(f"{remedy.label}: the model's running statistics do not lag"
                           + (f" ({facts.describe()})" if facts is not None else ""))
            continue
        overrides = remedy_overrides(naive, remedy)
        space = preset.space(remedy)
        points = grid(space)
        try:  # a remedy the setting cannot take (GroupNorm on simple-cnn, which has no norm layers) is skipped
            first = with_overrides(tree, overrides + points[0])
        except ConfigError as exc:
            skipped.append(f"{remedy.label}: does not apply here ({exc})")
            continue
        if len(points) == 1 and results_hash(first) == naive_hash:
            skipped.append(f"{remedy.label}: already part of the naive setting")
            continue
        out.append(Search(remedy, overrides, space, points))
    return out, skipped


def added_search(current: Variant, added: Variant, naive: Config, retune: bool = True) -> Search:
    """The search for the tuned remedy ``added`` joined to the set ``current``: with ``retune``, its own
    hyper-parameters tuned again on top (a server lr tuned under plain cross-entropy need not suit logit
    adjustment); without, one candidate at the values it was tuned to alone. The set's client lr stays, unless
    the remedy's own knobs hold the client lr (AdamW: another optimizer)."""
    remedy = REMEDY_BY_KEY[added.key]
    overrides = join_overrides([current.overrides, remedy_overrides(naive, remedy)])
    name = f"{current.key}+{remedy.key}"
    if retune:
        return Search(remedy, overrides, remedy.knobs, grid(remedy.knobs), name=name)
    own = {k.key for k in remedy.knobs}
    kept = tuple(o for o in added.overrides if o.split("=", 1)[0] in own)  # applied last, as a tuned point is
    return Search(remedy, overrides, (), [kept], name=name)


def combined(tree: dict, parts: list[Variant]) -> Variant:
    """Remedies applied together, each with its tuned values (see ``join_overrides``)."""
    overrides = join_overrides([v.overrides for v in parts])
    key = "+".join(v.key for v in parts)
    label = " + ".join(v.label for v in parts)
    return Variant(key, label, "combined", with_overrides(tree, overrides), tuple(overrides))


def join_overrides(groups: list[tuple[str, ...]]) -> tuple[str, ...]:
    """Override groups applied together: where two set one key (client.lr), the earlier (better on validation)
    wins, except that two client objectives that compose are joined (``client.objective=logit_adjust+scaffold``:
    a loss objective and a gradient objective)."""
    values: dict[str, str] = {}  # key -> value, in first-set order
    for group in groups:
        for item in group:
            k, value = item.split("=", 1)
            if k not in values:
                values[k] = value
            elif k == "client.objective":
                values[k] = joined_objective(values[k], value) or values[k]
    return tuple(f"{k}={v}" for k, v in values.items())
