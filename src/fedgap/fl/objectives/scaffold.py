"""SCAFFOLD (Karimireddy et al. 2020), control variates on the parameters (not on buffers).

Each minibatch gradient g becomes g + c - c_i. After its K local steps a client sets c_i+ to its mean raw
gradient over those steps: for plain SGD exactly the paper's option II, c_i+ = c_i - c + (x - y_i) / (K lr),
because then x - y_i = lr sum_k (g_k + c - c_i); unlike the displacement formula it stays right under
momentum, Adam and weight decay. The server moves c by (|S| / N) mean_i (c_i+ - c_i), the unweighted mean over
the sampled clients S of N (the paper's update).
"""

from __future__ import annotations

import torch

from fedgap.fl.objectives.base import GRADIENT, ClientOutcome, Objective, per_client


class ScaffoldObjective(Objective):
    name = "scaffold"
    role = GRADIENT
    summary = "gradients corrected by control variates c - c_i"
    citation = "Karimireddy et al. 2020"

    def server_init(self, params):
        return {k: torch.zeros_like(v) for k, v in params.items()}

    def payload(self, server_state):
        return dict(server_state)

    def server_update(self, server_state, uploads, num_clients):
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

    def client_init(self, start):
        return {k: torch.zeros_like(v) for k, v in start.items()}

    def begin(self, setup):
        super().begin(setup)
        c = setup.payload
        self.correction = {k: c[k] - setup.own[k] for k in c}
        self.grad_sum = {k: torch.zeros_like(v) for k, v in self.correction.items()}

    @torch.no_grad()
    def correct(self, grads):
        a = self.active(grads)
        for name, g in grads.items():
            self.grad_sum[name][:a].add_(g)
            g.add_(self.correction[name][:a])

    def end(self, steps):
        new_c = {k: s / per_client(steps.clamp_min(1).to(s.dtype), s) for k, s in self.grad_sum.items()}
        return ClientOutcome(own=new_c, upload={k: new_c[k] - self.setup.own[k] for k in new_c})
