"""The normalization policy (``model.norm_policy``): what happens to normalization layers in federation.

- ``average``: norm weights and running statistics are averaged with everything else (the naive baseline).
  The averaged running statistics are a mean of client statistics, each computed by a different client
  model on skewed data: not the statistics of the global model on any data.
- ``local`` (FedBN, Li et al. 2021): norm layers stay with each client across rounds (``ClientTask.own``);
  the global model carries their average, used for its own evaluation.
- ``recalibrate``: after aggregation the global model's BatchNorm statistics are computed exactly, in a
  federated pass: layer by layer, each client sends per-channel counts, sums and sums of squares of that
  layer's input over its data (earlier layers already recalibrated), and the server combines them into the
  population mean and variance over the union of the clients' data, written in the layer's own convention
  (``fedgap.fl.batchnorm``: torch keeps the unbiased variance, Keras the biased one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedgap.fl.batchnorm import BatchNormLayer, batchnorm_layers
from fedgap.fl.device import model_device
from fedgap.fl.evaluate import fixed_shape_batches
from fedgap.fl.state import State


@dataclass
class Moments:
    """Per-channel sufficient statistics of a layer input: count, sum and sum of squares (float64)."""

    count: int
    total: torch.Tensor
    total_sq: torch.Tensor

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def var(self) -> torch.Tensor:
        return (self.total_sq / self.count - self.mean**2).clamp_min(0)


class _Stop(Exception):
    """Raised by a hook once every wanted layer input of the batch is seen: the rest of the forward pass is not
    needed."""


@torch.inference_mode()
def input_moments(model: torch.nn.Module, state: State, x: torch.Tensor, layers: list[str],
                  batch_size: int = 1000) -> dict[str, Moments]:
    """Per-channel moments of the inputs of the BatchNorm layers ``layers`` (names, ``batchnorm_layers``) over
    the images ``x``, in one eval-mode pass (batches padded to a few fixed shapes, the padding rows left out of
    the sums)."""
    model.load_state_dict(state)
    model.eval()
    bns = batchnorm_layers(model)
    acc: dict[str, list[Moments]] = {name: [] for name in layers}
    real = [0]  # rows of the current batch that are data, not padding
    seen: set[str] = set()

    def hook(bn: BatchNormLayer, inputs) -> None:
        z = inputs[0][: real[0]].to(torch.float64)
        axis = bn.channel_axis % z.dim()
        dims = [d for d in range(z.dim()) if d != axis]
        acc[bn.name].append(Moments(z.numel() // z.shape[axis], z.sum(dims).cpu(), (z * z).sum(dims).cpu()))
        seen.add(bn.name)
        if len(seen) == len(acc):
            raise _Stop

    handles = [bns[name].module.register_forward_pre_hook(lambda _m, inputs, bn=bns[name]: hook(bn, inputs))
               for name in layers]
    device = model_device(model)  # engine.device: batches go where the model is
    try:
        for xb, real[0] in fixed_shape_batches(x, batch_size):
            seen.clear()
            try:
                model(xb.to(device))
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: sum_moments(parts) for name, parts in acc.items()}


def layer_input_moments(model: torch.nn.Module, state: State, x: torch.Tensor, layer: str,
                        batch_size: int = 1000) -> Moments:
    """Moments of the input of module ``layer`` over the images ``x``, with the model in eval mode."""
    return input_moments(model, state, x, [layer], batch_size)[layer]


def recalibrate(state: State, bn_layers: Sequence[BatchNormLayer],
                moments_of: Callable[[State, str], list[Moments]]) -> State:
    """Replace every BatchNorm layer's running statistics in ``state`` by the exact population statistics of
    its input over the union of the clients' data: the mean, and the variance in the layer's own convention
    (``BatchNormLayer.running_variance``). ``moments_of(state, layer name)`` returns one ``Moments`` per
    client (only these sums leave a client). Layers go in forward order, each pass seeing the earlier layers
    already recalibrated, so the result equals the statistics computed centrally over the union."""
    state = dict(state)
    for bn in bn_layers:
        total = sum_moments(moments_of(state, bn.name))
        ref = state[bn.mean_key]
        state[bn.mean_key] = total.mean.to(ref.dtype)
        state[bn.var_key] = bn.running_variance(total.var, total.count).to(ref.dtype)
    return state


class AveragePolicy:
    """``average``: norm layers are shared and averaged like every other layer (the naive baseline)."""

    name = "average"
    personal = False  # whether clients have personalized models worth evaluating (FedBN)

    def stepped(self, param_keys: list[str], norm_keys: set[str]) -> list[str]:
        """The parameters the server optimizer steps."""
        return list(param_keys)

    def client_start(self, global_state: State, own: Mapping[str, State]) -> State:
        """The state a client starts its round from."""
        return global_state

    def client_keeps(self, final: State, norm_keys: frozenset[str]) -> dict[str, State]:
        """What a client keeps for its next round, besides its objective's state."""
        return {}

    def after_aggregation(self, state: State, moments_of: Callable[[State, str], list[Moments]],
                          bn_layers: Sequence[BatchNormLayer]) -> State:
        """The global state once the server has aggregated the round."""
        return state


class LocalPolicy(AveragePolicy):
    """``local`` (FedBN): every client keeps its norm layers; the global norm layers are the clients' weighted
    mean (never a server-optimizer step), used to evaluate the global model."""

    name = "local"
    personal = True

    def stepped(self, param_keys, norm_keys):
        return [k for k in param_keys if k not in norm_keys]

    def client_start(self, global_state, own):
        return {**global_state, **own["norm"]} if own.get("norm") else global_state

    def client_keeps(self, final, norm_keys):
        return {"norm": {k: final[k] for k in norm_keys if k in final}} if norm_keys else {}


class RecalibratePolicy(AveragePolicy):
    """``recalibrate``: exact federated BatchNorm statistics of the global model after each aggregation."""

    name = "recalibrate"

    def after_aggregation(self, state, moments_of, bn_layers):
        return recalibrate(state, bn_layers, moments_of) if bn_layers else state


NORM_POLICIES: dict[str, type[AveragePolicy]] = {p.name: p for p in (AveragePolicy, LocalPolicy, RecalibratePolicy)}


def norm_policy(name: str) -> AveragePolicy:
    return NORM_POLICIES[name]()


def sum_moments(moments: list[Moments]) -> Moments:
    total = moments[0]
    for m in moments[1:]:
        total = total + m
    return total
