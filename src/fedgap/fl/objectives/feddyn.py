"""FedDyn (Acar et al., ICLR 2021, "Federated Learning Based on Dynamic Regularization").

Client i minimizes L_i(w) - <h_i, w> + alpha/2 ||w - w_global||^2, with h_i its state (the paper's
grad L_i(w_i^{t-1})): every gradient becomes g - h_i + alpha (w - w_global). After training the client sets
h_i <- h_i - alpha (w_i - w_global) and uploads w_i - w_global. The server keeps
h <- h - (alpha / N) sum_{i in S} (w_i - w_global) over the N clients and moves the new global model to
mean_i(w_i) - h / alpha (the paper's Algorithm 1; the mean is the sample-weighted one of every fedgap server,
and the correction follows whatever server optimizer produced the new parameters).
"""

from __future__ import annotations

import torch
from pydantic import Field

from fedgap.fl.objectives.base import GRADIENT, ClientOutcome, NoParams, Objective


class FedDynParams(NoParams):
    alpha: float = Field(0.01, gt=0, description="FedDyn regularization strength (Acar et al. use 0.01-0.1)")


class FedDynObjective(Objective):
    name = "feddyn"
    role = GRADIENT
    Params = FedDynParams
    summary = "dynamic regularizer -<h_i, w> + alpha/2 ||w - w_global||^2 (objective.feddyn.alpha)"
    citation = "Acar et al. 2021"

    def server_init(self, params):
        return {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}

    def server_update(self, server_state, uploads, num_clients):
        out = {k: h.clone() for k, h in server_state.items()}
        for up in uploads:
            for k, h in out.items():
                h.add_(up[k].to(torch.float64), alpha=-self.p.alpha / num_clients)
        return out

    def server_model(self, params, server_state):
        return {k: (v - server_state[k] / self.p.alpha if k in server_state else v) for k, v in params.items()}

    def client_init(self, start):
        return {k: torch.zeros_like(v) for k, v in start.items()}

    @torch.no_grad()
    def correct(self, grads):
        a = self.active(grads)
        for name, g in grads.items():
            g.sub_(self.setup.own[name][:a])
            g.add_(self.setup.params[name][:a] - self.setup.start[name], alpha=self.p.alpha)

    @torch.no_grad()
    def end(self, steps):
        moved = {k: p.detach() - self.setup.start[k] for k, p in self.setup.params.items()}
        own = {k: self.setup.own[k] - self.p.alpha * moved[k] for k in moved}
        return ClientOutcome(own=own, upload=moved)
