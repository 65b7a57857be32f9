"""What ``fedgap model-info`` reports about a model: its norm layers (and what ``model.norm`` replaced), its
BatchNorm layers' momentum (torch's convention) and eps, parameters, multiply-accumulate operations (MACs) per
image, and notes on what fedgap changed in a Keras model (``KerasModel.notes``: a softmax left out).

MACs are counted by forward hooks on one image in eval mode: a convolution costs
out_elements x (in_channels / groups) x kernel area, a linear layer out_elements x in_features. Norm layers,
activations and pooling are not counted (they are a few percent of a CNN's arithmetic); this is the usual
convention of FLOP counters that report "FLOPs" as multiply-adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fedgap.fl.batchnorm import batchnorm_layers
from fedgap.models.convert import Replacement, describe
from fedgap.models.norm import NORM_TYPES


@dataclass(frozen=True)
class BatchNormRow:
    layer: str
    momentum: float | None  # torch's convention: the weight of the new batch statistics
    eps: float
    variance: str  # what the running variance keeps: "unbiased" (torch) or "biased" (Keras)


@dataclass
class ModelInfo:
    norm_rows: list[Replacement]  # every norm layer: replaced ones with was -> now, the rest "kept"
    parameters: int
    macs_per_image: int
    batchnorm_rows: list[BatchNormRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def model_info(model: nn.Module, replaced: list[Replacement], image_shape: tuple[int, int, int]) -> ModelInfo:
    bns = [BatchNormRow(bn.name, bn.momentum, bn.eps, "unbiased" if bn.unbiased_var else "biased")
           for bn in batchnorm_layers(model).values()]
    params = sum(p.numel() for p in model.parameters())
    if hasattr(model, "norm_rows"):  # a Keras model (fedgap.models.keras_adapter)
        return ModelInfo(model.norm_rows(replaced), params, model.macs_per_image(image_shape), bns, model.notes)
    by_layer = {r.layer: r for r in replaced}
    rows = []
    for name, m in model.named_modules():
        if name in by_layer:
            rows.append(by_layer[name])
        elif isinstance(m, NORM_TYPES):
            rows.append(Replacement(name, describe(m), "kept"))
    return ModelInfo(rows, params, count_macs(model, image_shape), bns)


def count_macs(model: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass of one image (conv and linear layers)."""
    total = 0

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, nn.modules.conv._ConvNd):
            kernel = int(torch.tensor(module.kernel_size).prod())
            total += output.numel() * (module.in_channels // module.groups) * kernel
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    forward_once(model, image_shape, [m.register_forward_hook(hook) for m in model.modules()
                                      if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))])
    return total


def forward_once(model: nn.Module, image_shape: tuple[int, int, int], handles: list) -> None:
    """One evaluation-mode forward pass of a zero image through ``model`` (for the forward hooks whose ``handles``
    are given, removed afterwards); the model's training mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *image_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
