"""The CNN of the FedAvg paper (McMahan et al. 2017, section 3): two 5x5 convolutions with 32 and 64 channels,
each followed by 2x2 max pooling, a fully connected layer of 512 units with ReLU and a linear output layer.
With model.norm=none on 28x28 inputs it has exactly 1,663,370 parameters, as the paper states.
"""

from __future__ import annotations

from torch import nn

from fedgap.models.norm import make_norm


class FedAvgCNN(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, norm="none", groups=8, dropout=0.0, image_size=(28, 28)):
        super().__init__()
        bias = norm == "none"
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2, bias=bias), make_norm(norm, 32, groups), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2, bias=bias), make_norm(norm, 64, groups), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        h, w = image_size[0] // 4, image_size[1] // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * h * w, 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))
