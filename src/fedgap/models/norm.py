"""The normalization factory: one switch (``model.norm``) decides what follows every convolution.

- ``batch``: BatchNorm2d. Normalizes with statistics of the current batch in training and with running
  averages in evaluation. Under label skew, client batches and the averaged running statistics disagree:
  the first suspect when a federated MobileNet falls behind.
- ``group``: GroupNorm(model.groups, C). Per-sample statistics over channel groups; no running state.
- ``layer``: GroupNorm(1, C), i.e. LayerNorm over (C, H, W) with a per-channel affine.
- ``instance``: GroupNorm(C, C), i.e. InstanceNorm with a per-channel affine.
- ``none``: identity (the convolution then gets a bias).
"""

from __future__ import annotations

from torch import nn

from fedgap.fl.batchnorm import batchnorm_layers

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def make_norm(kind: str, channels: int, groups: int = 8) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(groups, channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"model.norm: unknown norm {kind!r}")


def norm_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys (weights, biases, running statistics, counters) that belong to normalization layers: every
    BatchNorm layer's (``fedgap.fl.batchnorm``), and those of the other norm layers (GroupNorm, LayerNorm, ...;
    a model that lists its own, the Keras adapter, returns them from ``fedgap_norm_state_keys()``)."""
    keys = {k for bn in batchnorm_layers(model).values() for k in bn.state_keys}
    own = getattr(model, "fedgap_norm_state_keys", None)
    if own is not None:
        return keys | own()
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            for name in module.state_dict():
                keys.add(f"{prefix}.{name}" if prefix else name)
    return keys


def float_norm_keys(model: nn.Module) -> set[str]:
    """The floating-point norm-layer keys: what the ``local`` (FedBN) policy keeps per client."""
    state = model.state_dict()
    return {k for k in norm_state_keys(model) if state[k].is_floating_point()}


def override_batchnorm(model: nn.Module, momentum: float | None, eps: float | None) -> None:
    """``model.bn_momentum`` / ``model.bn_eps``: set every BatchNorm layer's momentum (torch's convention, the
    weight of the new batch statistics) and eps; None keeps the model's own."""
    for bn in batchnorm_layers(model).values():
        if momentum is not None:
            bn.momentum = momentum
        if eps is not None:
            bn.eps = eps
