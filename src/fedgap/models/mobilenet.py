"""MobileNet-style networks for small grey images (28x28 by default, any size works: they end in a global
average pool).

- ``MobileNetLike``: the seed network practitioners start from: conv 3x3/32 stride 2, a depthwise-separable
  block to 64 (stride 1), one to 128 (stride 2), global average pool, linear. Norm + ReLU after every conv.
- ``MobileNetV1`` (Howard et al. 2017) and ``MobileNetV2`` (Sandler et al. 2018), with fewer downsampling
  stages so a 28x28 input ends at 7x7, and a width multiplier. Channel plans are in ``models.spec``.
"""

from __future__ import annotations

from torch import nn

from fedgap.models import spec
from fedgap.models.norm import make_norm


def conv_norm_act(c_in: int, c_out: int, kernel: int, stride: int, norm: str, groups: int,
                  *, depthwise: bool = False, act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=c_in if depthwise else 1,
                  bias=norm == "none"),
        make_norm(norm, c_out, groups),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def depthwise_separable(c_in: int, c_out: int, stride: int, norm: str, groups: int) -> nn.Sequential:
    return nn.Sequential(
        conv_norm_act(c_in, c_in, 3, stride, norm, groups, depthwise=True),
        conv_norm_act(c_in, c_out, 1, 1, norm, groups),
    )


class _Classifier(nn.Module):
    """Shared head: features -> global average pool -> dropout -> linear."""

    def __init__(self, features: nn.Module, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


class MobileNetLike(_Classifier):
    def __init__(self, in_channels=1, num_classes=10, norm="batch", groups=8, dropout=0.0):
        c = spec.MOBILENET_LIKE
        features = nn.Sequential(
            conv_norm_act(in_channels, c[0], 3, 2, norm, groups),
            depthwise_separable(c[0], c[2], 1, norm, groups),
            depthwise_separable(c[2], c[4], 2, norm, groups),
        )
        super().__init__(features, c[4], num_classes, dropout)


class MobileNetV1(_Classifier):
    def __init__(self, in_channels=1, num_classes=10, norm="batch", groups=8, dropout=0.0, width=1.0):
        c_in = spec.scaled(spec.V1_STEM, width)
        layers = [conv_norm_act(in_channels, c_in, 3, 1, norm, groups)]
        for c, stride in spec.V1_BLOCKS:
            c = spec.scaled(c, width)
            layers.append(depthwise_separable(c_in, c, stride, norm, groups))
            c_in = c
        super().__init__(nn.Sequential(*layers), c_in, num_classes, dropout)


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int, norm: str, groups: int):
        super().__init__()
        hidden = c_in * expansion
        layers = []
        if expansion != 1:
            layers.append(conv_norm_act(c_in, hidden, 1, 1, norm, groups, act=nn.ReLU6))
        layers += [
            conv_norm_act(hidden, hidden, 3, stride, norm, groups, depthwise=True, act=nn.ReLU6),
            conv_norm_act(hidden, c_out, 1, 1, norm, groups, act=None),  # linear bottleneck
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(_Classifier):
    def __init__(self, in_channels=1, num_classes=10, norm="batch", groups=8, dropout=0.0, width=1.0):
        c_in = spec.scaled(spec.V2_STEM, width)
        layers: list[nn.Module] = [conv_norm_act(in_channels, c_in, 3, 1, norm, groups, act=nn.ReLU6)]
        for t, c, n, s in spec.V2_BLOCKS:
            c = spec.scaled(c, width)
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t, norm, groups))
                c_in = c
        last = spec.scaled(spec.V2_LAST, max(1.0, width))
        layers.append(conv_norm_act(c_in, last, 1, 1, norm, groups, act=nn.ReLU6))
        super().__init__(nn.Sequential(*layers), last, num_classes, dropout)
