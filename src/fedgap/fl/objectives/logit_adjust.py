"""Logit adjustment with the client's label prior (balanced softmax; Menon et al., ICLR 2021, "Long-tail
learning via logit adjustment"; Ren et al., NeurIPS 2020, "Balanced Meta-Softmax"; used for federated label
skew by e.g. Zhang et al. 2022).

During local training the loss sees z_c + tau log pi_i(c), pi_i the client's own label distribution: a class
the client rarely sees must be beaten by a large margin before it is predicted, so the local model stops
pushing the classifier toward the client's few classes. The global model predicts with the plain logits.
tau = 1 is the balanced softmax. Absent classes get log(1e-12) (about -27.6): excluded in effect, without
an infinity (0 * -inf would be NaN at tau = 0).
"""

from __future__ import annotations

from pydantic import Field

from fedgap.fl.objectives.base import LOSS, NoParams, Objective


class LogitAdjustParams(NoParams):
    tau: float = Field(1.0, ge=0, description="weight of log pi_client(y) added to the logits in training")


class LogitAdjustObjective(Objective):
    name = "logit_adjust"
    role = LOSS
    Params = LogitAdjustParams
    summary = "logits + tau log pi_client(y) in local training (balanced softmax)"
    citation = "Menon et al. 2021"

    def logits(self, logits):
        return logits + self.p.tau * self.prior(logits).clamp_min(1e-12).log()
