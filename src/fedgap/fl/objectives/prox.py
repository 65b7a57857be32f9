"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks").

Local loss + mu/2 ||w - w_global||^2, so every parameter's gradient gains mu (w - w_global). Buffers are not
optimized. mu is ``server.mu`` (the key predates per-objective sections and is part of the stable interface).
"""

from __future__ import annotations

import torch
from pydantic import Field

from fedgap.fl.objectives.base import GRADIENT, NoParams, Objective


class ProxParams(NoParams):
    mu: float = Field(0.01, ge=0, description="FedProx proximal coefficient")


class ProxObjective(Objective):
    name = "prox"
    role = GRADIENT
    Params = ProxParams
    summary = "local loss + mu/2 ||w - w_global||^2 (server.mu)"
    citation = "Li et al. 2020"
    own_section = False  # mu is server.mu

    @classmethod
    def params_from(cls, cfg):
        return ProxParams(mu=cfg.server.mu)

    @torch.no_grad()
    def correct(self, grads):
        if self.p.mu == 0:
            return
        a = self.active(grads)
        for name, g in grads.items():
            g.add_(self.setup.params[name][:a] - self.setup.start[name], alpha=self.p.mu)
