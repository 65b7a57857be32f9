"""``model.norm`` for any model: replace its BatchNorm layers (1d and 2d) in place, as Opacus'
``ModuleValidator.fix`` does for differential privacy, so the doctor's normalization remedies (GroupNorm,
LayerNorm, ...) apply to a user's model exactly as to the built-in ones.

The replacement of a BatchNorm over C channels (``fedgap.models.norm.make_norm`` for the built-ins' meaning):

- ``group``: GroupNorm(model.groups, C); the groups must divide C, otherwise a one-line error names the layer;
- ``layer``: GroupNorm(1, C); ``instance``: GroupNorm(C, C), both with a per-channel affine;
- ``none``: Identity;
- ``batch``: nothing is replaced (the model stays as the user wrote it).

Channel counts are preserved, and an affine BatchNorm's weight and bias are copied into the new layer, so a
factory's own initialization of them (e.g. zero-initialized residual branches) survives the conversion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedgap.errors import ConfigError
from fedgap.models.norm import make_norm

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class Replacement:
    layer: str  # dotted module name
    was: str
    now: str


def describe(module: nn.Module) -> str:
    """A short text of a norm layer: 'BatchNorm2d(32)', 'GroupNorm(8, 32)', 'Identity'."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"{type(module).__name__}({module.num_features})"
    if isinstance(module, nn.GroupNorm):
        return f"GroupNorm({module.num_groups}, {module.num_channels})"
    return type(module).__name__


def convert_norm(model: nn.Module, kind: str, groups: int = 8) -> list[Replacement]:
    """Replace every BatchNorm1d/2d of ``model`` by the ``kind`` norm (in place); returns what was replaced.
    The groups are checked for every layer before anything is changed, so an error leaves the model intact."""
    found = [(name, m) for name, m in model.named_modules() if name and isinstance(m, BATCHNORMS)]
    if kind == "batch":
        return []
    if kind == "group":
        check_groups([(name, bn.num_features, type(bn).__name__) for name, bn in found], groups)
    done = []
    for name, bn in found:
        new = make_norm(kind, bn.num_features, groups)
        if bn.affine and isinstance(new, nn.GroupNorm):
            with torch.no_grad():
                new.weight.copy_(bn.weight)
                new.bias.copy_(bn.bias)
        new.to(device=bn.weight.device if bn.affine else None)
        new.train(bn.training)
        _set_submodule(model, name, new)
        done.append(Replacement(name, describe(bn), describe(new)))
    return done


def check_groups(found: list[tuple[str, int, str]], groups: int) -> None:
    """One line naming the first BatchNorm layer (name, channels, type) whose channels ``groups`` does not divide."""
    for name, channels, kind in found:
        if channels % groups:
            common = math.gcd(*(c for _, c, _ in found))
            divisors = [d for d in range(1, common + 1) if common % d == 0]
            raise ConfigError(
                f"model.groups: {groups} does not divide the {channels} channels of layer '{name}' "
                f"({kind}); divisors of every BatchNorm's channels: {', '.join(map(str, divisors))}"
            )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
