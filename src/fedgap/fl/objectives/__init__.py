"""Client objectives, one file each; this registry is the single source of their names (config validation,
``fedgap keys``, the doctor's help and the engine-equivalence tests all read it). Adding one: a file with an
``Objective`` subclass, and one line here (docs/algorithms.md, "Adding an algorithm").

``client.objective`` names one objective or joins a loss objective and a gradient objective with ``+``
(``logit_adjust+scaffold``; fedgap.fl.objectives.composite)."""

from __future__ import annotations

from fedgap.fl.objectives.base import GRADIENT, LOSS, ClientOutcome, ClientSetup, NoParams, Objective
from fedgap.fl.objectives.composite import CompositeObjective
from fedgap.fl.objectives.feddyn import FedDynObjective
from fedgap.fl.objectives.fedlc import FedLCObjective
from fedgap.fl.objectives.fedrs import FedRSObjective
from fedgap.fl.objectives.label_smoothing import LabelSmoothingObjective
from fedgap.fl.objectives.logit_adjust import LogitAdjustObjective
from fedgap.fl.objectives.prox import ProxObjective
from fedgap.fl.objectives.scaffold import ScaffoldObjective

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (Objective, ProxObjective, ScaffoldObjective, FedDynObjective, LogitAdjustObjective,
                FedLCObjective, FedRSObjective, LabelSmoothingObjective)
}


def objective_spec(spec: str) -> str:
    """``client.objective`` checked and in its canonical form: one registered name, or a loss objective and a
    gradient objective joined by ``+`` (loss part first, whatever order was given). ValueError otherwise."""
    names = [n.strip() for n in spec.split("+")]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown objective {unknown[0]!r} (one of {' | '.join(OBJECTIVES)}, or a loss "
                         f"objective + a gradient objective)")
    if len(names) == 1:
        return names[0]
    loss, gradient = ([n for n in names if OBJECTIVES[n].role == role] for role in (LOSS, GRADIENT))
    if len(names) != 2 or len(loss) != 1 or len(gradient) != 1:
        raise ValueError(f"{spec!r} cannot be joined: '+' joins one loss objective "
                         f"({' | '.join(with_role(LOSS))}) and one gradient objective "
                         f"({' | '.join(with_role(GRADIENT))})")
    return f"{loss[0]}+{gradient[0]}"


def with_role(role: str) -> list[str]:
    """The registered objectives of one role (LOSS or GRADIENT), in registry order."""
    return [name for name, cls in OBJECTIVES.items() if cls.role == role]


def objective_params(spec: str, cfg) -> tuple:
    """The hyper-parameters of each part of ``spec`` from a config (one Params per part)."""
    return tuple(OBJECTIVES[n].params_from(cfg) for n in spec.split("+"))


def make_objective(spec: str, params=None, **values) -> Objective:
    """The objective ``spec`` (a name, or two joined by ``+``) with its hyper-parameters: a Params instance or
    field values for one objective, a tuple with one Params per part (``objective_params``) for either."""
    names = spec.split("+")
    if isinstance(params, tuple):
        parts = [OBJECTIVES[n](p) for n, p in zip(names, params, strict=True)]
    else:
        if len(names) > 1 and (params is not None or values):
            raise ValueError("a joined objective takes a tuple of Params, one per part")
        parts = [OBJECTIVES[n](params if params is not None else OBJECTIVES[n].Params(**values)) for n in names]
    return parts[0] if len(parts) == 1 else CompositeObjective(*parts)


__all__ = ["GRADIENT", "LOSS", "OBJECTIVES", "ClientOutcome", "ClientSetup", "CompositeObjective", "NoParams",
           "Objective", "make_objective", "objective_params", "objective_spec", "with_role"]
