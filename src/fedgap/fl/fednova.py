"""FedNova (Wang et al., NeurIPS 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization"): normalized averaging of clients that take different numbers of local steps.

Client i starts a round from the global model x, takes tau_i SGD steps with heavy-ball momentum rho (torch's
SGD, a fresh buffer every round: v_k = rho v_(k-1) + g_k, w_(k+1) = w_k - lr v_k) and ends at y_i. Unrolled,
y_i - x = -lr sum_k a_ik g_k with a_ik = (1 - rho^(tau_i - k + 1)) / (1 - rho), so the update sums tau_i
gradients with the total weight

    a_i = ||a_i||_1 = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho)          (tau_i without momentum).

FedAvg's sum_i p_i (y_i - x) therefore weights a client by how many steps it took, and converges to a stationary
point of sum_i p_i a_i F_i / sum_j p_j a_j rather than of sum_i p_i F_i (the paper's objective inconsistency).
FedNova divides each update by a_i and rescales the mean by tau_eff = sum_i p_i a_i:

    Delta = tau_eff sum_i p_i (y_i - x) / a_i,        p_i = n_i / sum_j n_j over the round's clients

(the paper's update with its default tau_eff, and the a_i for momentum SGD of its section on local solvers; the
FedNova of NIID-Bench, Li et al. 2022, and of Flower's niid_bench baseline computes the same a_i and Delta).

Here that is one rescaling before the usual aggregation (``normalized``): client i's update y_i - x is multiplied
by tau_eff / a_i, so the sample-weighted mean of the rescaled states minus x is Delta, and every other piece stays
as it is: the server optimizer steps on Delta like on any pseudo-gradient (plain server SGD with lr 1 gives
x + Delta, NIID-Bench's FedNova; ``server.optimizer=adam`` gives FedAdam on the normalized update), and the
client objective is free (a loss objective, FedProx, SCAFFOLD). Only the parameters the server optimizer steps
are rescaled: running statistics are estimates, not updates, and keep the plain mean. a_i depends on the step
count and momentum only: whatever an objective adds to a gradient (a proximal term, a control variate, weight
decay) counts as part of that gradient, not as a change of a_i (the paper's FedProx variant folds the proximal
term into a_i instead; not done here). With equal step counts every tau_eff / a_i is 1 and FedNova is FedAvg.
The clients must train with SGD (the config refuses Adam and AdamW, whose steps have no such a_i).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

from fedgap.fl.client import ClientResult
from fedgap.fl.state import State

Normalize = Callable[[State, Sequence[ClientResult], Sequence[str]], list[ClientResult]]


def step_weight(steps: int, momentum: float) -> float:
    """a_i = ||a_i||_1: the total weight of ``steps`` gradients in an SGD update with heavy-ball momentum rho."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


def normalized(model: State, results: Sequence[ClientResult], keys: Sequence[str],
               momentum: float) -> list[ClientResult]:
    """The results with each client's update of ``keys`` (the stepped parameters) rescaled by tau_eff / a_i,
    in float64, around the global ``model``; a client whose factor is exactly 1 is passed on as it is."""
    weights = [step_weight(res.steps, momentum) for res in results]
    sizes = [float(res.num_samples) for res in results]
    tau_eff = sum(n * a for n, a in zip(sizes, weights, strict=True)) / sum(sizes)
    out = []
    for res, a in zip(results, weights, strict=True):
        scale = tau_eff / a if a > 0 else 1.0  # a client without a step did not move: nothing to rescale
        if scale == 1.0:
            out.append(res)
            continue
        state = dict(res.state)
        for k in keys:
            x = model[k].double()
            state[k] = x + scale * (res.state[k].double() - x)
        out.append(dataclasses.replace(res, state=state))
    return out


def normalizer(cfg) -> Normalize | None:
    """FedNova's rescaling for ``server_update`` when the config's preset asks for it (``server.algorithm=
    fednova``), with the clients' SGD momentum; None for plain averaging."""
    from fedgap.fl.presets import PRESETS

    if not PRESETS[cfg.server.algorithm].normalized:
        return None
    return functools.partial(normalized, momentum=cfg.client.momentum)
