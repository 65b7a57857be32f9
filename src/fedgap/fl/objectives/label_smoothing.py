"""Label smoothing (Szegedy et al. 2016): cross-entropy against (1 - eps) one-hot + eps / classes.

Kept as the smallest example of a loss-changing objective (docs/algorithms.md, "Adding an algorithm").
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from fedgap.fl.objectives.base import LOSS, NoParams, Objective


class LabelSmoothingParams(NoParams):
    epsilon: float = Field(0.1, ge=0, lt=1, description="probability mass spread over all classes")


class LabelSmoothingObjective(Objective):
    name = "label_smoothing"
    role = LOSS
    Params = LabelSmoothingParams
    summary = "cross-entropy with smoothed labels"
    citation = "Szegedy et al. 2016"

    def loss(self, logits, y):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none",
                               label_smoothing=self.p.epsilon).view(y.shape)
