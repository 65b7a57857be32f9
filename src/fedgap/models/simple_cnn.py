"""NIID-Bench's "simple-cnn" for MNIST-sized inputs (Li et al., ICDE 2022, "Federated Learning on Non-IID Data
Silos: An Experimental Study", section V; its SimpleCNNMNIST, also the model of Flower's ``niid_bench`` baseline):
two 5x5 convolutions without padding (to 6, then 16 channels), each followed by ReLU and 2x2 max pooling, then
dense layers of 120 and 84 units with ReLU and a linear output layer. A 28x28 image ends as 16 x 4 x 4 = 256
features; with 10 classes the model has 44,426 parameters.

It has no normalization layers, so ``model.norm`` has nothing to act on: the config resolves it to ``none``
and refuses any other value (fedgap.config). ``model.dropout`` (default 0, as in NIID-Bench) drops features
before the output layer.
"""

from __future__ import annotations

from torch import nn


class SimpleCNN(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, dropout=0.0, image_size=(28, 28)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        h, w = ((image_size[0] - 4) // 2 - 4) // 2, ((image_size[1] - 4) // 2 - 4) // 2
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * h * w, 120), nn.ReLU(inplace=True), nn.Linear(120, 84),
            nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))
