"""Keras' BatchNormalization as fedgap's ``BatchNormLayer``, and ``model.norm`` for Keras models.

- ``KerasBatchNorm``: a ``keras.layers.BatchNormalization`` seen through ``fedgap.fl.batchnorm.BatchNormLayer``.
  Keras' ``momentum`` is the weight of the old statistics (default 0.99): this view reads and writes
  ``1 - momentum`` (torch's convention, so Keras' default is 0.01 here). Keras keeps the biased batch variance
  in ``moving_variance``. The layer's input has its channels on ``axis`` (-1 for channels-last images).
- ``convert_keras_norm(model, kind, groups)``: ``model.norm=group|layer|instance|none`` rebuilds a functional
  or Sequential model with ``keras.models.clone_model``, every BatchNormalization replaced by Keras'
  ``GroupNormalization(groups)`` (group), ``GroupNormalization(1)`` (layer: statistics over all channels and
  positions, a per-channel affine, as fedgap's ``layer`` means for torch models), ``GroupNormalization(C)``
  (instance) or ``Identity`` (none). Every other layer keeps its weights and a BatchNormalization's gamma and
  beta become the new layer's, as ``fedgap.models.convert`` does for torch models. The groups are checked
  for every layer before anything is built.
"""

from __future__ import annotations

import inspect

from fedgap.errors import ConfigError
from fedgap.fl.batchnorm import BatchNormLayer
from fedgap.models.convert import Replacement, check_groups


class KerasBatchNorm(BatchNormLayer):
    unbiased_var = False

    def __init__(self, name: str, layer, key_of):
        """``key_of(variable)``: the variable's state key in the adapter."""
        self.name, self.module = name, layer
        self.mean_key, self.var_key = key_of(layer.moving_mean), key_of(layer.moving_variance)
        self.scale_key = key_of(layer.gamma) if layer.scale else None
        self.shift_key = key_of(layer.beta) if layer.center else None
        self.channel_axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]

    @property
    def momentum(self) -> float:
        return 1.0 - self.module.momentum

    @momentum.setter
    def momentum(self, value: float) -> None:
        self.module.momentum = 1.0 - value

    @property
    def eps(self) -> float:
        return self.module.epsilon

    @eps.setter
    def eps(self, value: float) -> None:
        self.module.epsilon = value


def channels(bn) -> int:
    return int(bn.moving_mean.shape[0])


def describe(layer) -> str:
    """'BatchNormalization(32)', 'GroupNormalization(8, 32)', 'Identity'."""
    from keras import layers

    if isinstance(layer, layers.BatchNormalization):
        return f"BatchNormalization({channels(layer)})"
    if isinstance(layer, layers.GroupNormalization):
        return f"GroupNormalization({layer.groups}, {int(layer.gamma.shape[0]) if layer.scale else '?'})"
    return type(layer).__name__


def replacement(bn, kind: str, groups: int):
    """The layer that replaces BatchNormalization ``bn`` under ``model.norm=kind``."""
    from keras import layers

    if kind == "none":
        return layers.Identity()
    n = {"group": groups, "layer": 1, "instance": channels(bn)}[kind]
    return layers.GroupNormalization(groups=n, axis=bn.axis, center=bn.center, scale=bn.scale,
                                     dtype=bn.dtype_policy)


def convert_keras_norm(model, kind: str, groups: int, name: str):
    """(the model with its BatchNormalization layers replaced by ``kind``, what was replaced); the model itself
    when ``kind`` is batch or it has no BatchNormalization."""
    import keras
    from keras import layers

    found = [(layer.name, layer) for layer in model._flatten_layers(include_self=False)
             if isinstance(layer, layers.BatchNormalization)]
    if kind == "batch" or not found:
        return model, []
    from keras.src.models.functional import Functional  # not exported; what clone_model itself tests for

    if not isinstance(model, (keras.Sequential, Functional)):
        raise ConfigError(f"model.name: {name} is a subclassed keras.Model; model.norm={kind} can only rebuild a "
                          "functional or Sequential model (keep model.norm=batch)")
    if kind == "group":
        check_groups([(n, channels(bn), "BatchNormalization") for n, bn in found], groups)
    source: dict[int, object] = {}  # id(new layer) -> the layer it was cloned from

    def clone(layer):
        new = (replacement(layer, kind, groups) if isinstance(layer, layers.BatchNormalization)
               else layer.__class__.from_config(layer.get_config()))
        source[id(new)] = layer
        return new

    def call(layer, *args, **kwargs):  # a BatchNormalization was called with mask=; its replacement takes none
        if "mask" in kwargs and "mask" not in inspect.signature(layer.call).parameters:
            kwargs.pop("mask")
        return layer(*args, **kwargs)

    extra = {} if isinstance(model, keras.Sequential) else {"call_function": call}
    try:
        new_model = keras.models.clone_model(model, clone_function=clone, recursive=True, **extra)
    except Exception as exc:
        raise ConfigError(f"model.name: model.norm={kind} could not rebuild {name} with keras.models.clone_model: "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    done = []
    for layer in new_model._flatten_layers(include_self=False):
        old = source.get(id(layer))
        if old is None:
            continue
        if isinstance(old, layers.BatchNormalization):
            if isinstance(layer, layers.GroupNormalization):
                if old.scale:
                    layer.gamma.assign(old.gamma)
                if old.center:
                    layer.beta.assign(old.beta)
            done.append(Replacement(old.name, describe(old), f"{describe(layer)} '{layer.name}'"))
        elif old.weights:
            layer.set_weights(old.get_weights())
    return new_model, done
