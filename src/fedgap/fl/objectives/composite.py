"""Two objectives joined: one that changes what the loss sees (a LOSS objective: logit adjustment, FedLC,
FedRS, label smoothing) and one that corrects the gradients and keeps state (a GRADIENT objective: FedProx,
SCAFFOLD, FedDyn). ``client.objective=logit_adjust+scaffold`` treats the label skew and the client drift at
once; each part keeps its own hyper-parameters (``objective.logit_adjust.tau``, ...).

The parts touch disjoint hooks (``Objective.role``), so joining them is delegation, not new math: the loss
hook is the LOSS part's; ``correct``, the client state and the whole server side are the GRADIENT part's.
SCAFFOLD's control variate then records the gradients of the adjusted loss, which is what its clients descend.
"""

from __future__ import annotations

from fedgap.fl.objectives.base import GRADIENT, LOSS, Objective


class CompositeObjective(Objective):
    """A LOSS objective and a GRADIENT objective run as one."""

    def __init__(self, loss: Objective, gradient: Objective):
        if loss.role != LOSS or gradient.role != GRADIENT:
            raise ValueError(f"a composite joins a loss objective and a gradient objective, "
                             f"got {loss.name} ({loss.role or 'plain'}) and {gradient.name} "
                             f"({gradient.role or 'plain'})")
        super().__init__(None)
        self.loss_part, self.gradient_part = loss, gradient
        self.name = f"{loss.name}+{gradient.name}"

    # ---- server side: the GRADIENT part's
    def server_init(self, params):
        return self.gradient_part.server_init(params)

    def payload(self, server_state):
        return self.gradient_part.payload(server_state)

    def server_update(self, server_state, uploads, num_clients):
        return self.gradient_part.server_update(server_state, uploads, num_clients)

    def server_model(self, params, server_state):
        return self.gradient_part.server_model(params, server_state)

    # ---- client side
    def client_init(self, start):
        return self.gradient_part.client_init(start)

    def begin(self, setup):
        super().begin(setup)
        self.loss_part.begin(setup)
        self.gradient_part.begin(setup)

    def logits(self, logits):
        return self.loss_part.logits(logits)

    def loss(self, logits, y):
        return self.loss_part.loss(logits, y)

    def correct(self, grads):
        self.gradient_part.correct(grads)

    def end(self, steps):
        return self.gradient_part.end(steps)
