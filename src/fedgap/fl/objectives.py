"""Client objectives: what a client minimizes locally, and the server-side state that goes with it.

Each objective corrects the minibatch gradient of the local loss before the optimizer step:

- ``local`` (FedAvg): no correction.
- ``prox`` (FedProx, Li et al. 2020): local loss + mu/2 * ||w - w_global||^2, so the gradient gains
  mu * (w - w_global). Parameters only; buffers are not optimized.
- ``scaffold`` (Karimireddy et al. 2020): the gradient is corrected by the control variates, g + c - c_i.
  After training the client sets c_i+ to its average raw gradient over the K local steps. For plain SGD this is
  exactly the paper's option II, c_i+ = c_i - c + (x - y_i) / (K * lr_local), because then x - y_i =
  lr_local * sum_k (g_k + c - c_i); unlike the displacement formula it stays right under momentum, Adam and
  weight decay. The server keeps c and moves it by (|S| / N) * mean_i (c_i+ - c_i), the unweighted mean
  over the sampled clients S of N (the paper's update).

Per-client state (c_i) lives on the server in the ``ClientStore`` and travels with each task; an objective
never keeps state between calls, so any engine can run it in any process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedgap.fl.state import State


@dataclass
class ClientSetup:
    params: dict[str, torch.nn.Parameter]  # the client model's live parameters, by name
    start: Mapping[str, torch.Tensor]  # the state the client started from this round
    payload: Mapping[str, torch.Tensor]  # the objective's round payload from the server (SCAFFOLD: c)
    own: Mapping[str, torch.Tensor]  # this client's persistent objective state (SCAFFOLD: c_i), may be empty


@dataclass
class ClientOutcome:
    own: State = field(default_factory=dict)  # new persistent state for this client
    upload: State = field(default_factory=dict)  # what the server-side update needs (SCAFFOLD: c_i+ - c_i)


class LocalObjective:
    """FedAvg's client: plain local loss."""

    name = "local"

    def __init__(self, mu: float = 0.0):
        self.mu = mu

    # ---- server side
    def server_init(self, params: Mapping[str, torch.Tensor]) -> State:
        return {}

    def payload(self, server_state: Mapping[str, torch.Tensor]) -> State:
        return {}

    def server_update(self, server_state: State, uploads: list[State], num_clients: int) -> State:
        return server_state

    # ---- client side
    def begin(self, setup: ClientSetup) -> None:
        self.setup = setup

    def correct(self) -> None:
        """Called after backward(), before the optimizer step; edits .grad in place."""

    def end(self, steps: int) -> ClientOutcome:
        return ClientOutcome()


class ProxObjective(LocalObjective):
    """FedProx: gradient of mu/2 ||w - w_global||^2 added to every parameter's gradient."""

    name = "prox"

    def correct(self) -> None:
        if self.mu == 0:
            return
        start = self.setup.start
        for name, p in self.setup.params.items():
            if p.grad is not None:
                p.grad.add_(p.detach() - start[name], alpha=self.mu)


class ScaffoldObjective(LocalObjective):
    """SCAFFOLD with control variates on the parameters (not on buffers)."""

    name = "scaffold"

    def server_init(self, params: Mapping[str, torch.Tensor]) -> State:
        return {k: torch.zeros_like(v) for k, v in params.items()}

    def payload(self, server_state: Mapping[str, torch.Tensor]) -> State:
        return dict(server_state)

    def server_update(self, server_state: State, uploads: list[State], num_clients: int) -> State:
        if not uploads:
            return server_state
        scale = 1.0 / num_clients  # (|S| / N) * mean over S  ==  sum over S / N
        out = {}
        for k, c in server_state.items():
            acc = c.to(torch.float64).clone()
            for up in uploads:
                acc.add_(up[k].to(torch.float64), alpha=scale)
            out[k] = acc.to(c.dtype)
        return out

    def begin(self, setup: ClientSetup) -> None:
        super().begin(setup)
        c = setup.payload
        c_i = setup.own or {k: torch.zeros_like(v) for k, v in c.items()}
        self.c_i = {k: v.clone() for k, v in c_i.items()}
        self.correction = {k: c[k] - self.c_i[k] for k in c}
        self.grad_sum = {k: torch.zeros_like(v) for k, v in c.items()}

    def correct(self) -> None:
        for name, p in self.setup.params.items():
            if p.grad is None:
                continue
            self.grad_sum[name].add_(p.grad)
            p.grad.add_(self.correction[name])

    def end(self, steps: int) -> ClientOutcome:
        new_c_i = {k: g / max(steps, 1) for k, g in self.grad_sum.items()}
        delta = {k: new_c_i[k] - self.c_i[k] for k in new_c_i}
        return ClientOutcome(own=new_c_i, upload=delta)


OBJECTIVES: dict[str, type[LocalObjective]] = {
    "local": LocalObjective,
    "prox": ProxObjective,
    "scaffold": ScaffoldObjective,
}


def make_objective(name: str, mu: float = 0.0) -> LocalObjective:
    return OBJECTIVES[name](mu=mu)
