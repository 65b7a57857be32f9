"""Model state as plain dicts of tensors (a state_dict), and the few operations the server needs on them.

A federated model's state is its parameters *and* its buffers (BatchNorm running statistics). fedgap moves
floating-point entries between server and clients; integer entries (BatchNorm's num_batches_tracked) are
bookkeeping that no averaging makes sense for, so they stay as the global model has them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

State = dict[str, torch.Tensor]


def clone(state: Mapping[str, torch.Tensor]) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state: its keys, dtypes, shapes and values (not the memory layout), in key order. Two runs
    whose initial models have the same digest started from the same weights bit for bit."""
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weighted_mean(states: list[Mapping[str, torch.Tensor]], weights: list[float], *,
                  keep_float64: bool = False) -> State:
    """sum_i w_i * state_i / sum_i w_i over the keys of the first state, accumulated in float64 in the given
    order so the result does not depend on which engine or process produced the states. With
    ``keep_float64`` the result stays in float64 (the server computes its update in float64 so that FedAvg
    with one client returns that client's model bit for bit)."""
    total = float(sum(weights))
    if not states or total <= 0:
        raise ValueError("weighted_mean needs at least one state with positive weight")
    out: State = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for s, w in zip(states, weights, strict=True):
            acc.add_(s[key].to(torch.float64), alpha=w / total)
        out[key] = acc if keep_float64 else acc.to(states[0][key].dtype)
    return out
