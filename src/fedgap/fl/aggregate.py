"""The server's update of one round, as a pure function: ``server_update(state, results, components, lr)``.

- Under FedNova (``server.algorithm=fednova``) each client's update of the stepped parameters is first rescaled
  by tau_eff / a_i (``fedgap.fl.fednova``); the rest is unchanged.
- The clients' final floating-point states are averaged, weighted by their sample counts, in client-id order
  and in float64 (``weighted_mean``), so the result does not depend on the engine. In float64,
  x + 1.0 (mean - x) == mean exactly: FedAvg with one client is that client's model.
- Parameters the server optimizer steps (all but FedBN's norm layers) move by its step on the pseudo-gradient
  mean - x; floating buffers (BatchNorm running statistics) and FedBN's global norm layers become the weighted
  client mean. Integer buffers (num_batches_tracked) stay as they are: counters, never averaged.
- The objective's server state moves with the clients' uploads (SCAFFOLD's c, FedDyn's h), and the objective
  has a last word on the new parameters (FedDyn: minus h / alpha).
- Clients' persistent state (SCAFFOLD c_i, FedDyn h_i, FedBN norm layers) is stored for their next round.

Nothing is modified in place: the old state stays valid (callbacks compare the two). The running average
(``server.average``) is carried through unchanged: it follows the norm policy's pass (``fedgap.fl.averaging``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from fedgap.fl.averaging import as_model
from fedgap.fl.client import ClientResult
from fedgap.fl.objectives import Objective
from fedgap.fl.server import ServerOptimizer
from fedgap.fl.state import State, weighted_mean


@dataclass(frozen=True)
class ServerState:
    """Everything the server holds between rounds: what a checkpoint saves and restores, as one object."""

    model: State  # the global model's state_dict: what clients train from
    optimizer: State  # the server optimizer's state (float64)
    objective: State  # the objective's server state (SCAFFOLD's c, FedDyn's h)
    clients: Mapping[int, Mapping[str, State]]  # per-client persistent state: "objective", "norm"
    average: State | None = None  # server.average: the running average of the round models (float64)

    def evaluated(self) -> State:
        """The model the server evaluates and hands out: the running average under server.average, else the
        round's global model (which training continues from in either case)."""
        return self.model if self.average is None else as_model(self.average, self.model)

    def to_dict(self) -> dict:
        """Plain containers of tensors (a checkpoint reads them back with ``weights_only=True``)."""
        return {"model": self.model, "optimizer": self.optimizer, "objective": self.objective,
                "clients": {cid: dict(own) for cid, own in self.clients.items()}, "average": self.average}

    @classmethod
    def from_dict(cls, d: Mapping) -> ServerState:
        return cls(d["model"], d["optimizer"], d["objective"], d["clients"], d.get("average"))


@dataclass(frozen=True)
class ServerComponents:
    optimizer: ServerOptimizer
    objective: Objective
    stepped_keys: tuple[str, ...]  # parameters the server optimizer steps
    num_clients: int  # N of the whole federation (SCAFFOLD's and FedDyn's 1/N)
    normalize: Callable[..., list[ClientResult]] | None = None  # FedNova's rescaling of the updates (fl.fednova)


def server_update(state: ServerState, results: Sequence[ClientResult], c: ServerComponents,
                  lr: float | None = None) -> ServerState:
    if c.normalize is not None:
        results = c.normalize(state.model, results, c.stepped_keys)
    mean = weighted_mean([res.state for res in results], [float(res.num_samples) for res in results],
                         keep_float64=True)
    params = {k: state.model[k].double() for k in c.stepped_keys}
    delta = {k: mean[k] - params[k] for k in c.stepped_keys}
    new_params, optimizer = c.optimizer.step(params, delta, state.optimizer, lr)
    objective = c.objective.server_update(state.objective, [res.upload for res in results if res.upload],
                                          c.num_clients)
    new_params = c.objective.server_model(new_params, objective)
    model = dict(state.model)
    for k, v in {**mean, **new_params}.items():  # the weighted client mean, then the optimizer's parameters
        model[k] = v.to(state.model[k].dtype)
    clients = {cid: dict(own) for cid, own in state.clients.items()}
    for res in results:
        if res.own:
            clients.setdefault(res.client_id, {}).update(res.own)
    return replace(state, model=model, optimizer=optimizer, objective=objective, clients=clients)
