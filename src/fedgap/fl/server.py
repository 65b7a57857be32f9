"""Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

The server treats the sample-weighted mean client delta of the parameters, Delta = sum_i p_i (y_i - x), as a
pseudo-gradient pointing downhill and applies an optimizer to it:

- ``sgd``      x <- x + lr * Delta                       (lr = 1 is FedAvg: x becomes the mean client model)
- ``momentum`` v <- beta * v + Delta;  x <- x + lr * v   (FedAvgM, Hsu et al. 2019; beta = server.momentum)
- ``adam``     m <- b1 m + (1-b1) Delta;  v <- b2 v + (1-b2) Delta^2
- ``yogi``     m as adam;  v <- v - (1-b2) Delta^2 sign(v - Delta^2)
- ``adagrad``  m as adam;  v <- v + Delta^2
               and for the three adaptive ones  x <- x + lr * m / (sqrt(v) + tau),  with v_0 = tau^2, m_0 = 0,
               no bias correction, as in the paper.

Only parameters go through the optimizer. Floating-point buffers (BatchNorm running statistics) are set to
their weighted client mean: they are estimates of data statistics, not weights being optimized, and an
adaptive step on them would make no sense.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from fedgap.fl.state import State


class ServerOptimizer:
    name = "sgd"
    # Defaults of server.lr / server.momentum. SGD with lr 1 is plain FedAvg (the new model is the weighted mean
    # of the client models). The adaptive optimizers take steps of about lr per coordinate, so their lr is on
    # the scale of a weight change per round; 10^-2 is in the range Reddi et al. found best for CNNs.
    default_lr = 1.0
    default_momentum = 0.0

    def __init__(self, lr: float = 1.0, momentum: float = 0.0, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3):
        self.lr, self.momentum, self.beta1, self.beta2, self.tau = lr, momentum, beta1, beta2, tau

    def init(self, params: Mapping[str, torch.Tensor]) -> State:
        return {}

    def step(self, params: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
             state: State, lr: float | None = None) -> tuple[State, State]:
        """Return (new params, new optimizer state); inputs are not modified. ``lr`` overrides server.lr for
        this step (a schedule)."""
        lr = self.lr if lr is None else lr
        return {k: params[k] + lr * delta[k] for k in params}, state


class MomentumServer(ServerOptimizer):
    name = "momentum"
    default_momentum = 0.9

    def init(self, params):
        return {f"v.{k}": torch.zeros_like(p) for k, p in params.items()}

    def step(self, params, delta, state, lr=None):
        lr = self.lr if lr is None else lr
        new_state = {f"v.{k}": self.momentum * state[f"v.{k}"] + delta[k] for k in params}
        return {k: params[k] + lr * new_state[f"v.{k}"] for k in params}, new_state


class _AdaptiveServer(ServerOptimizer, ABC):
    default_lr = 0.01

    def init(self, params):
        state = {f"m.{k}": torch.zeros_like(p) for k, p in params.items()}
        state.update({f"v.{k}": torch.full_like(p, self.tau**2) for k, p in params.items()})
        return state

    @abstractmethod
    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """The variant's rule for v given the squared pseudo-gradient d2."""

    def step(self, params, delta, state, lr=None):
        lr = self.lr if lr is None else lr
        new_state: State = {}
        out: State = {}
        for k, x in params.items():
            d = delta[k]
            m = self.beta1 * state[f"m.{k}"] + (1 - self.beta1) * d
            v = self.second_moment(state[f"v.{k}"], d * d)
            new_state[f"m.{k}"], new_state[f"v.{k}"] = m, v
            out[k] = x + lr * m / (v.sqrt() + self.tau)
        return out, new_state


class AdamServer(_AdaptiveServer):
    name = "adam"

    def second_moment(self, v, d2):
        return self.beta2 * v + (1 - self.beta2) * d2


class YogiServer(_AdaptiveServer):
    name = "yogi"

    def second_moment(self, v, d2):
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)


class AdagradServer(_AdaptiveServer):
    name = "adagrad"

    def second_moment(self, v, d2):
        return v + d2


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    "sgd": ServerOptimizer,
    "momentum": MomentumServer,
    "adam": AdamServer,
    "yogi": YogiServer,
    "adagrad": AdagradServer,
}


def server_lr(server_cfg, round_: int) -> float:
    """The server lr of round ``round_`` (1-based): server.lr, or its cosine decay to 0 after server.rounds."""
    if server_cfg.lr_schedule == "cosine":
        return server_cfg.lr * 0.5 * (1 + math.cos(math.pi * (round_ - 1) / server_cfg.rounds))
    return server_cfg.lr


def make_server_optimizer(server_cfg) -> ServerOptimizer:
    return SERVER_OPTIMIZERS[server_cfg.optimizer](
        lr=server_cfg.lr, momentum=server_cfg.momentum, beta1=server_cfg.beta1, beta2=server_cfg.beta2,
        tau=server_cfg.tau,
    )
