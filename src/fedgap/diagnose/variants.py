"""What the doctor runs: the centralized baseline, the naive federated run, each remedy alone, and the best
combination of the remedies that helped.

A remedy is a set of config overrides applied on top of the user's setting (the naive run), so it changes one
thing: the client objective, the server optimizer, the norm layer or policy, or a client regularizer.
Overrides name the components explicitly (``client.objective=prox`` rather than ``server.algorithm=fedprox``)
so that a remedy means the same whatever preset the user started from. Remedies are grouped by the cause of
the gap they address; the diagnosis compares the groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedgap.config import Config, _merge, config_from_dict, config_to_dict, parse_overrides, read_yaml

# cause groups, in the order the report lists them
NORMALIZATION, DRIFT, SERVER, REGULARIZATION = "normalization", "client drift", "server optimizer", "regularization"
CAUSES = (NORMALIZATION, DRIFT, SERVER, REGULARIZATION)


@dataclass(frozen=True)
class Remedy:
    key: str
    label: str
    cause: str
    overrides: tuple[str, ...]
    needs_batchnorm: bool = False  # only meaningful when the naive model has BatchNorm
    why: str = ""


REMEDIES: tuple[Remedy, ...] = (
    Remedy("groupnorm", "GroupNorm", NORMALIZATION, ("model.norm=group",),
           why="per-sample statistics: nothing to average, nothing skewed"),
    Remedy("layernorm", "LayerNorm", NORMALIZATION, ("model.norm=layer",),
           why="per-sample statistics over all channels"),
    Remedy("fedbn", "FedBN (local BN)", NORMALIZATION, ("model.norm_policy=local",), needs_batchnorm=True,
           why="each client keeps its own BatchNorm layers (Li et al. 2021)"),
    Remedy("recalibrate", "BN recalibration", NORMALIZATION, ("model.norm_policy=recalibrate",),
           needs_batchnorm=True, why="exact federated BatchNorm statistics of the global model"),
    Remedy("fedprox", "FedProx", DRIFT, ("client.objective=prox",),
           why="proximal term mu/2 ||w - w_global||^2 (Li et al. 2020)"),
    Remedy("scaffold", "SCAFFOLD", DRIFT, ("client.objective=scaffold",),
           why="control variates correct the client gradients (Karimireddy et al. 2020)"),
    Remedy("fedavgm", "FedAvgM", SERVER, ("server.optimizer=momentum", "server.lr=1.0", "server.momentum=0.9"),
           why="server momentum on the mean update (Hsu et al. 2019)"),
    Remedy("fedadam", "FedAdam", SERVER, ("server.optimizer=adam", "server.lr=0.01"),
           why="server Adam on the mean update (Reddi et al. 2021)"),
    Remedy("fedyogi", "FedYogi", SERVER, ("server.optimizer=yogi", "server.lr=0.01"),
           why="server Yogi on the mean update (Reddi et al. 2021)"),
    Remedy("adamw", "AdamW + weight decay", REGULARIZATION,
           ("client.optimizer=adamw", "client.lr=0.001", "client.weight_decay=0.01"),
           why="decoupled weight decay on the clients (lr 1e-3, the usual AdamW scale)"),
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
            parts.append(f"{' and '.join(left_out)} left out (GroupNorm and FedAdam stand for them)")
        if seeds == 1:
            parts.append("one seed")
        return ", ".join(parts)


PRESETS = {
    "quick": DoctorPreset(
        "quick", rounds=30, eval_every=3, central_epochs=3,
        remedies=("groupnorm", "fedbn", "recalibrate", "fedprox", "scaffold", "fedavgm", "fedadam", "adamw",
                  "augment"),
    ),
    "full": DoctorPreset("full", rounds=150, eval_every=5, central_epochs=15, remedies=tuple(r.key for r in REMEDIES)),
}


@dataclass
class Variant:
    key: str  # file-name safe id: "naive", "central", "fedprox", "combined"
    label: str
    cause: str  # "" for naive and central
    cfg: Config
    overrides: tuple[str, ...] = ()  # what it changes against the naive run


def base_tree(preset: DoctorPreset, config_path: str | None, overrides: list[str]) -> dict:
    """The naive run's config tree: the preset's rounds and evaluation, then the user's YAML and overrides
    (the user's settings win)."""
    tree = parse_overrides([f"server.rounds={preset.rounds}", f"eval.every={preset.eval_every}"])
    if config_path:
        tree = _merge(tree, read_yaml(config_path))
    return _merge(tree, parse_overrides(overrides))


def with_overrides(tree: dict, overrides: tuple[str, ...] | list[str]) -> Config:
    return config_from_dict(_merge(tree, parse_overrides(list(overrides))))


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


def single_variants(naive: Config, tree: dict, preset: DoctorPreset) -> tuple[list[Variant], list[str]]:
    """Each remedy of the preset alone, skipping those that do not apply or equal the naive run. Returns the
    variants and one line per skipped remedy (said in the report)."""
    from fedgap.config import results_hash

    naive_hash = results_hash(naive)
    out, skipped = [], []
    for key in preset.remedies:
        remedy = REMEDY_BY_KEY[key]
        if remedy.needs_batchnorm and naive.model.norm != "batch":
            skipped.append(f"{remedy.label}: the model has no BatchNorm (model.norm={naive.model.norm})")
            continue
        overrides = remedy_overrides(naive, remedy)
        cfg = with_overrides(tree, overrides)
        if results_hash(cfg) == naive_hash:
            skipped.append(f"{remedy.label}: already part of the naive setting")
            continue
        out.append(Variant(key, remedy.label, remedy.cause, cfg, overrides))
    return out, skipped


def combination(tree: dict, winners: list[Variant]) -> Variant | None:
    """The best remedy of each cause group that helped, applied together; None if fewer than two helped."""
    if len(winners) < 2:
        return None
    overrides: list[str] = []
    seen: dict[str, str] = {}
    for v in winners:
        for item in v.overrides:
            k = item.split("=", 1)[0]
            if k in seen and seen[k] != item:
                continue  # two remedies set one key (e.g. client.lr): the higher-ranked one wins
            seen[k] = item
            if item not in overrides:
                overrides.append(item)
    label = " + ".join(v.label for v in winners)
    return Variant("combined", label, "combined", with_overrides(tree, overrides), tuple(overrides))
