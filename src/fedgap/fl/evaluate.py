"""Evaluation of a model state on a set of images: accuracy and mean cross-entropy.

Runs under inference mode in large batches. ``train_mode=True`` evaluates with BatchNorm normalizing by the
statistics of each evaluation batch instead of its running averages (other layers, dropout included, stay in
eval mode): the doctor compares both to make the
BatchNorm mismatch visible (running statistics are restored afterwards, nothing is changed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedgap import seeding
from fedgap.fl.batchnorm import batchnorm_layers
from fedgap.fl.device import model_device
from fedgap.fl.state import State


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    count: int

    @staticmethod
    def merge(parts: list[EvalResult]) -> EvalResult:
        """Combine evaluations of disjoint slices (engines that split the test set over workers)."""
        n = sum(p.count for p in parts)
        correct = sum(round(p.accuracy * p.count) for p in parts)
        loss = sum(p.loss * p.count for p in parts)
        return EvalResult(correct / max(n, 1), loss / max(n, 1), n)


SHAPE_MULTIPLE = 64


def fixed_shape_batches(x: torch.Tensor, batch_size: int, multiple: int = SHAPE_MULTIPLE):
    """Yield (batch, real rows) over ``x`` in batches of ``batch_size`` rows, the last one padded with zero rows
    up to a multiple of ``multiple``. For passes where rows are independent (eval mode, statistics hooks) only.

    Why: oneDNN builds and caches kernels per input shape (up to 1024 of them, each with shape-sized scratch
    memory). Evaluating clients or label-matched subsets of every size created a new shape per client, and a
    process's memory grew by about 100-250 MB per round up to 2 GB (measured with BatchNorm recalibration and
    with the doctor's diagnostics); padded, each layer sees at most batch_size / multiple shapes."""
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        n = len(xb)
        padded = min(batch_size, -(-n // multiple) * multiple)
        if padded > n:
            xb = torch.cat([xb, xb.new_zeros((padded - n, *xb.shape[1:]))])
        yield xb, n


@torch.inference_mode()
def evaluate(model: torch.nn.Module, state: State | None, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 500, *, train_mode: bool = False, channels_last: bool = False) -> EvalResult:
    if state is not None:
        model.load_state_dict(state)
    saved = {k: v.clone() for k, v in model.state_dict().items()} if train_mode else None
    model.eval()
    if train_mode:  # only BatchNorm switches to batch statistics; dropout stays off
        for bn in batchnorm_layers(model).values():
            bn.module.train()
    correct = 0
    loss_sum = 0.0
    device = model_device(model)  # engine.device: batches go where the model is
    # Train mode normalizes by batch statistics, which padding would change: there, no padding (multiple 1).
    start = 0
    for xb, real in fixed_shape_batches(x, batch_size, multiple=1 if train_mode else SHAPE_MULTIPLE):
        yb = y[start : start + real].to(device)
        start += real
        xb = xb.to(device)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        logits = model(xb)[:real]
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    if saved is not None:
        model.load_state_dict(saved)
    model.eval()
    n = len(x)
    return EvalResult(correct / max(n, 1), loss_sum / max(n, 1), n)


def label_matched_subset(test_y: np.ndarray, client_labels: np.ndarray, size: int, seed: int,
                         client_id: int) -> np.ndarray:
    """Test rows drawn (without replacement within each label) so their label proportions match a client's
    training labels: the test set for that client's personalized (FedBN) model."""
    rng = seeding.rng(seed, seeding.PERSONAL_TEST, client_id)
    num_classes = int(max(test_y.max(), client_labels.max())) + 1
    share = np.bincount(client_labels, minlength=num_classes) / len(client_labels)
    want = np.floor(share * size).astype(np.int64)
    rows = []
    for c in np.flatnonzero(want):
        pool = np.flatnonzero(test_y == c)
        rows.append(rng.choice(pool, size=min(want[c], len(pool)), replace=False))
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)


def label_matched_accuracy(evaluate_fn, state: State, test_x: torch.Tensor, test_y: torch.Tensor,
                           client_labels: np.ndarray, size: int, seed: int, client_id: int) -> float | None:
    """A model's accuracy on the client's own label mix: ``evaluate_fn(state, x, y)`` on ``size`` test rows drawn
    with the client's label proportions (``label_matched_subset``); None when no row is drawn. FedBN's
    personalized accuracy and the per-client accuracy diagnostics both measure this."""
    rows = label_matched_subset(test_y.numpy(), client_labels, size, seed, client_id)
    if not len(rows):
        return None
    idx = torch.from_numpy(rows)
    return evaluate_fn(state, test_x[idx], test_y[idx]).accuracy
