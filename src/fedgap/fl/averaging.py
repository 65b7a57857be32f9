"""Server-side averaging of the round models: the model the server evaluates and hands out is a running
average of the global models of past rounds; training always continues from the round's own model.

Polynomial-decay averaging (Shamir & Zhang, ICML 2013, "Stochastic Gradient Descent for Non-smooth
Optimization: Convergence Results and Optimal Averaging Schemes"), with x_t the global model after round t
(after aggregation and the norm policy) and eta = ``server.average``:

    avg_1 = x_1;   avg_t = (1 - w_t) avg_{t-1} + w_t x_t,   w_t = (eta + 1) / (t + eta)

eta = 0 is the uniform average of every round (Polyak & Juditsky 1992); a larger eta forgets faster: the
average covers about the last t / (eta + 1) rounds, a window that grows with the run. A fixed exponential
decay would not: one that suits round 30 averages too few rounds at round 200, one that suits round 200
mixes in the poor early models at round 30 (measured on the default setting; docs/algorithms.md). The weights
depend only on t, so a run extended from its checkpoint equals an uninterrupted one.

Why it helps under label skew: each round's few clients pull x_t toward their labels, so the global model
swings from round to round; the average over many rounds cancels much of that pull (in federated learning:
server-side SWA, Caldarola et al., ECCV 2022). Floating tensors (weights and BatchNorm running statistics) are
averaged in float64; integer buffers (num_batches_tracked) are x_t's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedgap.fl.state import State


def new_model_weight(eta: float, round_: int) -> float:
    """w_t: the weight of round ``round_``'s model (1-based) in the average; 1 in the first round."""
    return (eta + 1.0) / (round_ + eta)


def average_update(average: Mapping[str, torch.Tensor] | None, model: Mapping[str, torch.Tensor], eta: float,
                   round_: int) -> State:
    """The average after round ``round_`` (float64 for floating tensors); inputs are not modified."""
    w = new_model_weight(eta, round_)
    out: State = {}
    for k, x in model.items():
        if not x.is_floating_point():
            out[k] = x.clone()
        elif average is None or w >= 1.0:
            out[k] = x.to(torch.float64, copy=True)
        else:
            out[k] = (1.0 - w) * average[k] + w * x.to(torch.float64)
    return out


def as_model(average: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> State:
    """The average in the dtypes of the model's state ``like`` (to evaluate or save it)."""
    return {k: v.to(like[k].dtype) for k, v in average.items()}
