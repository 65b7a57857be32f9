"""FedRS, restricted softmax (Li & Zhan, KDD 2021, "FedRS: Federated Learning with Restricted Softmax for
Label Distribution Non-IID Data").

During local training the logits of the classes the client does not hold are scaled by alpha in [0, 1]:
z_c <- alpha z_c for n_i(c) = 0. The missing classes' classifier weights then get (alpha times) smaller
updates from data that cannot contain them. alpha = 1 is FedAvg; the paper uses 0.5.
"""

from __future__ import annotations

from pydantic import Field

from fedgap.fl.objectives.base import LOSS, NoParams, Objective


class FedRSParams(NoParams):
    alpha: float = Field(0.5, ge=0, le=1, description="scale of the logits of classes the client lacks")


class FedRSObjective(Objective):
    name = "fedrs"
    role = LOSS
    Params = FedRSParams
    summary = "logits of classes the client lacks scaled by alpha in local training"
    citation = "Li & Zhan 2021"

    def logits(self, logits):
        present = self.setup.label_counts[: logits.shape[0], None, :] > 0
        scale = present.to(logits.dtype) * (1 - self.p.alpha) + self.p.alpha
        return logits * scale
