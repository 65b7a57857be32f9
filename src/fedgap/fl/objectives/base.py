"""The client objective interface: what a client minimizes locally, and the server-side state that goes with it.

One object, run by every engine. Every client-side tensor has a leading client dimension: the per-client path
(``fedgap.fl.client.local_update``) runs one client as a cohort of one ([1, ...]); the vectorized engine runs
a cohort of K clients at once ([K, ...]). An objective is written once, with element-wise operations that
broadcast over that dimension, so both paths run the same code. Clients that finished their steps sit behind
the active prefix [:A] of a cohort; ``loss`` and ``correct`` get tensors for the A active clients and slice
their own per-client tensors to match.

Per client and round the engine calls ``begin`` (with ``ClientSetup``), then for every minibatch ``loss``
(per-sample losses from the logits, the loss hook) and, after backward, ``correct`` (edits the raw gradients
before the optimizer step), and at the end ``end`` (new persistent client state and what the server needs).
Per round the server calls ``payload`` (what every client receives), ``server_update`` (its own state from
the uploads) and ``server_model`` (a last word on the new global parameters; identity but for FedDyn).

Persistent per-client state lives on the server in the client store and travels with each task, so an
objective keeps nothing between calls and any engine can run it in any process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from fedgap.fl.state import State

LOSS, GRADIENT = "loss", "gradient"  # Objective.role


class NoParams(BaseModel):
    """An objective's hyper-parameters: a pydantic model whose fields are config keys ``objective.<name>.*``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


@dataclass
class ClientSetup:
    """What a cohort of K clients (K = 1 on the per-client path) starts a round with."""

    params: dict[str, torch.Tensor]  # live parameters by name, [K, *shape] (views: edits move the model)
    start: Mapping[str, torch.Tensor]  # the global parameters of this round, [*shape] (broadcast over K)
    payload: Mapping[str, torch.Tensor]  # the objective's round payload from the server (SCAFFOLD: c)
    own: Mapping[str, torch.Tensor]  # persistent client state, [K, *shape] (``client_init`` for new clients)
    label_counts: torch.Tensor  # [K, num_classes]: training samples of each class the client holds


@dataclass
class ClientOutcome:
    own: State = field(default_factory=dict)  # new persistent state, [K, *shape]
    upload: State = field(default_factory=dict)  # what the server-side update needs, [K, *shape]

    def client(self, k: int) -> tuple[State, State]:
        """Client k's own state and upload."""
        return {n: v[k] for n, v in self.own.items()}, {n: v[k] for n, v in self.upload.items()}


def per_client(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [K] vector shaped to broadcast against a [K, *shape] tensor."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


class Objective:
    """FedAvg's client: the plain cross-entropy of the local data; no correction, no state."""

    name = "local"
    Params: type[BaseModel] = NoParams
    summary = "plain local cross-entropy (FedAvg)"
    citation = "McMahan et al. 2017"
    own_section = True  # its Params are config keys objective.<name>.* (if it has any)
    # What it changes, so that two objectives can be joined (``logit_adjust+scaffold``, fedgap.fl.objectives.
    # composite): LOSS objectives only override ``logits``/``loss``; GRADIENT objectives only the gradient
    # correction and the state (client and server). A composition holds at most one of each.
    role = ""

    def __init__(self, params: BaseModel | None = None):
        self.p = params if params is not None else self.Params()

    @classmethod
    def params_from(cls, cfg) -> BaseModel:
        """The hyper-parameters from a config: ``objective.<name>`` by default."""
        return getattr(cfg.objective, cls.name, None) or cls.Params()

    # ---- server side
    def server_init(self, params: Mapping[str, torch.Tensor]) -> State:
        return {}

    def payload(self, server_state: Mapping[str, torch.Tensor]) -> State:
        return {}

    def server_update(self, server_state: State, uploads: list[State], num_clients: int) -> State:
        return server_state

    def server_model(self, params: State, server_state: State) -> State:
        """The new global parameters after the server optimizer's step (float64)."""
        return params

    # ---- client side (all tensors [K, ...] or [A, ...])
    def client_init(self, start: Mapping[str, torch.Tensor]) -> State:
        """Persistent state of a client that has not taken part yet (unstacked, like ``start``)."""
        return {}

    def begin(self, setup: ClientSetup) -> None:
        self.setup = setup

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the loss sees, [A, B, classes]; the global model always predicts with plain logits."""
        return logits

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample losses [A, B] from logits [A, B, classes] and labels [A, B]: the loss hook."""
        z = self.logits(logits)
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)

    def correct(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Edit the raw gradients [A, ...] of the active clients in place, before the optimizer step."""

    def end(self, steps: torch.Tensor) -> ClientOutcome:
        """After training: ``steps`` [K] optimizer steps each client took."""
        return ClientOutcome()

    # ---- helpers
    def active(self, grads: Mapping[str, torch.Tensor]) -> int:
        return next(iter(grads.values())).shape[0] if grads else 0

    def prior(self, like: torch.Tensor) -> torch.Tensor:
        """The active clients' label distributions, [A, 1, classes] (broadcasts over the batch), in the dtype of
        the logits ``like`` [A, B, classes]."""
        counts = self.setup.label_counts[: like.shape[0]].to(like.dtype)
        return (counts / counts.sum(-1, keepdim=True).clamp_min(1))[:, None, :]
