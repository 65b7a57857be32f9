"""Client objectives, one file each; this registry is the single source of their names (config validation,
``fedgap keys``, the doctor's help and the engine-equivalence tests all read it). Adding one: a file with an
``Objective`` subclass, and one line here (docs/algorithms.md, "Adding an algorithm")."""

from __future__ import annotations

from fedgap.fl.objectives.base import ClientOutcome, ClientSetup, NoParams, Objective
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


def make_objective(name: str, params=None, **values) -> Objective:
    """The objective ``name`` with its hyper-parameters (a Params instance, or field values)."""
    cls = OBJECTIVES[name]
    return cls(params if params is not None else cls.Params(**values))


__all__ = ["OBJECTIVES", "ClientOutcome", "ClientSetup", "NoParams", "Objective", "make_objective"]
