"""FedLC, federated logit calibration (Zhang et al., ICML 2022, "Federated Learning with Label Distribution
Skew via Logits Calibration").

During local training the loss sees z_c - tau n_i(c)^(-1/4), n_i(c) the client's count of class c (eq. 7 of
the paper, the softmax over all classes as the authors' code computes it): rare classes get their logits
lowered most, so the local model must raise them, which cancels its pull toward the frequent ones. Absent
classes (n = 0) are counted as 1e-8 (a shift of 100 tau): excluded in effect, as the paper's infinity does.
"""

from __future__ import annotations

from pydantic import Field

from fedgap.fl.objectives.base import LOSS, NoParams, Objective


class FedLCParams(NoParams):
    tau: float = Field(1.0, ge=0, description="calibration strength (the paper tunes it in 0.01-1)")


class FedLCObjective(Objective):
    name = "fedlc"
    role = LOSS
    Params = FedLCParams
    summary = "logits - tau n_client(y)^(-1/4) in local training"
    citation = "Zhang et al. 2022"

    def logits(self, logits):
        counts = self.setup.label_counts[: logits.shape[0], None, :].to(logits.dtype)
        return logits - self.p.tau * counts.clamp_min(1e-8).pow(-0.25)
