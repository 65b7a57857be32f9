"""Model factory: ``build_model(model_config, image_shape, num_classes)``."""

from __future__ import annotations

from torch import nn

from fedgap.models.cnn import FedAvgCNN
from fedgap.models.mobilenet import MobileNetLike, MobileNetV1, MobileNetV2


def build_model(cfg, image_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """Build ``cfg.name`` with ``cfg.norm``; initialization uses torch's global RNG (seed it first)."""
    c, h, w = image_shape
    common = dict(in_channels=c, num_classes=num_classes, norm=cfg.norm, groups=cfg.groups, dropout=cfg.dropout)
    if cfg.name == "mobilenet-like":
        return MobileNetLike(**common)
    if cfg.name == "mobilenet-v1":
        return MobileNetV1(**common, width=cfg.width)
    if cfg.name == "mobilenet-v2":
        return MobileNetV2(**common, width=cfg.width)
    if cfg.name == "cnn":
        return FedAvgCNN(**common, image_size=(h, w))
    raise ValueError(f"model.name: unknown model {cfg.name!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
