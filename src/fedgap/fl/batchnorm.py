"""A BatchNorm layer, whatever framework built it: the one view of BatchNorm that fedgap's norm policies (FedBN,
recalibration), diagnostics (BN statistics distance, train-mode evaluation) and ``model.bn_momentum`` /
``model.bn_eps`` act on.

A BatchNorm layer (Ioffe & Szegedy 2015) normalizes its input per channel c,

    y = gamma_c (x - mu_c) / sqrt(var_c + eps) + beta_c,

with the statistics (mu, var) of the current batch in training and with running estimates in evaluation, which
training updates after every batch as

    running <- (1 - momentum) running + momentum batch_statistic

(``momentum`` here always in torch's convention: the weight of the new batch; Keras' ``momentum=0.99`` is the
weight of the old statistics, 0.01 in this convention). Frameworks differ in what they keep of the batch
variance: torch's ``running_var`` tracks the unbiased variance (n / (n - 1) times the biased one, n values per
channel in the batch), Keras' ``moving_variance`` the biased one. Both normalize a batch by its biased variance.

``batchnorm_layers(model)`` lists them: torch's BatchNorm1d/2d/3d modules (with running statistics), or, for a
model that lists its own (the Keras adapter, ``fedgap.models.keras_adapter``), what its
``fedgap_batchnorm_layers()`` returns. Nothing here knows Keras.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn


class BatchNormLayer(ABC):
    """One BatchNorm layer of a model: where its input can be seen, its state keys, its settings."""

    name: str  # the layer's name in the model (its state keys start with it); the same in every process
    module: nn.Module  # forward pre-hooks on it see its input; ``module.train()`` makes it use batch statistics
    mean_key: str  # state key of the running mean
    var_key: str  # state key of the running variance
    scale_key: str | None  # gamma (None when the layer has no scale)
    shift_key: str | None  # beta (None when the layer has no shift)
    channel_axis: int  # the axis of the layer's input that holds the channels (torch 1; Keras channels-last -1)
    unbiased_var: bool  # True: the running variance tracks the unbiased batch variance (torch); False: biased

    @property
    @abstractmethod
    def momentum(self) -> float | None:
        """Weight of the new batch statistics in the running ones (torch's convention); None: a cumulative
        average (torch's momentum=None)."""

    @momentum.setter
    @abstractmethod
    def momentum(self, value: float) -> None: ...

    @property
    @abstractmethod
    def eps(self) -> float: ...

    @eps.setter
    @abstractmethod
    def eps(self, value: float) -> None: ...

    @property
    def state_keys(self) -> tuple[str, ...]:
        """Every floating state key of the layer: what FedBN keeps on each client."""
        return tuple(k for k in (self.scale_key, self.shift_key, self.mean_key, self.var_key) if k is not None)

    def running_variance(self, biased_var, count: int):
        """The running variance this layer's own convention keeps for a population of ``count`` values per
        channel whose biased variance is ``biased_var`` (what exact recalibration writes)."""
        return biased_var * (count / (count - 1)) if self.unbiased_var and count > 1 else biased_var


class TorchBatchNorm(BatchNormLayer):
    """torch's ``_BatchNorm`` (BatchNorm1d/2d/3d) with running statistics."""

    channel_axis = 1
    unbiased_var = True

    def __init__(self, name: str, module: nn.modules.batchnorm._BatchNorm):
        self.name, self.module = name, module
        prefix = f"{name}." if name else ""
        self.mean_key, self.var_key = f"{prefix}running_mean", f"{prefix}running_var"
        self.scale_key = f"{prefix}weight" if module.affine else None
        self.shift_key = f"{prefix}bias" if module.affine else None

    @property
    def momentum(self) -> float | None:
        return self.module.momentum

    @momentum.setter
    def momentum(self, value: float) -> None:
        self.module.momentum = value

    @property
    def eps(self) -> float:
        return self.module.eps

    @eps.setter
    def eps(self, value: float) -> None:
        self.module.eps = value


def batchnorm_layers(model: nn.Module) -> dict[str, BatchNormLayer]:
    """Every BatchNorm layer of ``model`` with running statistics, by name, in forward (definition) order."""
    own = getattr(model, "fedgap_batchnorm_layers", None)
    if own is not None:
        return own()
    return {name: TorchBatchNorm(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
