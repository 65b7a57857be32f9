"""What the doctor reads off the naive model once it is built: its BatchNorm layers' settings. Remedies that only
make sense for some models (FedBN needs BatchNorm; a momentum override needs running statistics that lag) are
chosen from these facts, and the diagnosis names them (a Keras model's BatchNorm defaults differ from torch's)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedgap.fl.batchnorm import batchnorm_layers

TORCH_MOMENTUM = 0.1  # torch's default: running statistics over about the last 10 batches; less is said to lag


@dataclass(frozen=True)
class ModelFacts:
    bn_momenta: tuple[float | None, ...] = ()  # per BatchNorm layer, torch's convention (None: cumulative average)
    bn_eps: tuple[float, ...] = ()

    @property
    def has_batchnorm(self) -> bool:
        return bool(self.bn_momenta)

    @property
    def lagging_bn(self) -> bool:
        """Some BatchNorm layer's running statistics follow the model more slowly than torch's default."""
        return any(m is None or m < TORCH_MOMENTUM for m in self.bn_momenta)

    def describe(self) -> str:
        """'5 BatchNorm layers, momentum 0.01, eps 0.001' (ranges where layers differ)."""
        def values(xs) -> str:
            shown = sorted({x for x in xs if x is not None})
            text = f"{shown[0]:g}" if len(shown) == 1 else f"{shown[0]:g} to {shown[-1]:g}" if shown else ""
            return text + (" and cumulative" if None in xs and shown else "cumulative" if None in xs else "")
        n = len(self.bn_momenta)
        layers = f"{n} BatchNorm layer{'s' if n != 1 else ''}"
        return f"{layers}, momentum {values(self.bn_momenta)}, eps {values(self.bn_eps)}"

    def as_dict(self) -> dict:
        return {"batchnorm_layers": len(self.bn_momenta), "bn_momentum": list(self.bn_momenta),
                "bn_eps": list(self.bn_eps)}


def facts_of(model: nn.Module) -> ModelFacts:
    bns = list(batchnorm_layers(model).values())
    return ModelFacts(tuple(bn.momentum for bn in bns), tuple(bn.eps for bn in bns))
