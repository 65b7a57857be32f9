"""The vectorized engine: a cohort of clients trained at once as one batched model (``engine.name=vectorized``).

It reproduces ``fedgap.fl.client.local_update`` for every client of the cohort, up to float rounding:

- each client starts from ``start_state`` (the global state, under FedBN with its own norm layers), gets a fresh
  optimizer and its batch order from ``epoch_orders``; its augmentation is drawn from its own generator and its
  dropout masks from its own ``torch.manual_seed`` stream, exactly as ``local_update`` draws them;
- parameters, BatchNorm buffers, optimizer state and control variates are stacked [K, ...] per client; every
  step runs one batched forward/backward (``fedgap.engines.cohort_model``) and one batched optimizer step
  (``fedgap.engines.cohort_optim``) over the clients that still have a batch;
- unequal clients: cohort members are sorted by step count (largest first), so the clients still training at
  step t are a prefix [:A] of the stack and finished clients are simply not touched; within a step a short
  batch (a client's last of an epoch) is padded with zero rows that are masked out of the loss, and so of
  every gradient, and out of the BatchNorm statistics.

A round's clients run in cohorts of ``engine.cohort_size`` (largest clients first, so cohort members have
similar sizes and little padding), on ``engine.device``. Evaluation and BN recalibration use the base
engine's local runner. Results are sorted by client id, as from every engine.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from fedgap import seeding
from fedgap.engines.base import Engine, RoundOutput
from fedgap.engines.cohort_model import CohortModel, StepRows
from fedgap.engines.cohort_optim import CohortOptimizer
from fedgap.engines.results import failure_from_exception
from fedgap.fl.augment import affine_theta, apply_affine
from fedgap.fl.client import (
    ClientHParams,
    ClientResult,
    ClientTask,
    RoundContext,
    client_objective,
    client_result,
    epoch_orders,
    label_counts,
    own_states,
    raise_if_injected,
    start_state,
)
from fedgap.fl.objectives import ClientSetup
from fedgap.models import build_model
from fedgap.models.keras_adapter import KerasModel
from fedgap.runtime import tune_allocator


class VectorizedEngine(Engine):
    name = "vectorized"

    def __init__(self, cfg, data, hp):
        super().__init__(cfg, data, hp)
        if isinstance(self.local.model, KerasModel):  # refused before the run writes a file
            CohortModel(self.local.model)

    def start(self) -> None:
        tune_allocator()
        torch.set_num_threads(self.cfg.engine.threads or os.cpu_count() or 1)
        self.device = torch.device(self.cfg.engine.device)
        model = build_model(self.cfg.model, self.data.image_shape, self.data.num_classes)
        self.cohort = CohortModel(model, self.cfg.engine.channels_last)
        self.x = self.data.train_x.to(self.device)
        self.y = self.data.train_y.to(self.device)

    def train(self, ctx: RoundContext, tasks: list[ClientTask]) -> RoundOutput:
        if not hasattr(self, "cohort"):
            self.start()
        out = RoundOutput([])
        runnable = []
        for task in tasks:
            try:
                raise_if_injected(task, self.hp)
                runnable.append(task)
            except Exception as exc:
                out.failures.append(failure_from_exception(task.client_id, exc))
        size = self.cfg.engine.cohort_size
        runnable.sort(key=lambda t: (-num_steps(len(t.indices), self.hp), t.client_id))
        for start in range(0, len(runnable), size):
            group = runnable[start : start + size]
            try:
                out.results += train_cohort(self.cohort, self.x, self.y, ctx, group, self.hp, self.device)
            except Exception as exc:  # the whole cohort is dropped, as its clients' devices would be
                out.failures += [failure_from_exception(t.client_id, exc) for t in group]
        return out.in_client_order()


def num_steps(n: int, hp: ClientHParams) -> int:
    return hp.epochs * math.ceil(n / hp.batch_size)


def batch_table(ctx: RoundContext, tasks: list[ClientTask], hp: ClientHParams) -> np.ndarray:
    """Training-set rows of every client's every step: [K, T_max, B], -1 for padding. Client k's step t is
    batch t mod S_k of epoch t div S_k (S_k = ceil(n_k / B)), rows in its ``epoch_orders`` order."""
    b = hp.batch_size
    steps = [num_steps(len(t.indices), hp) for t in tasks]
    table = np.full((len(tasks), max(steps, default=0), b), -1, dtype=np.int64)
    for k, task in enumerate(tasks):
        idx = np.asarray(task.indices, dtype=np.int64)
        n = len(idx)
        per_epoch = math.ceil(n / b)
        for e, order in enumerate(epoch_orders(hp, ctx.round, task.client_id, n)):
            rows = np.full(per_epoch * b, -1, dtype=np.int64)
            rows[:n] = idx[order]
            table[k, e * per_epoch : (e + 1) * per_epoch] = rows.reshape(per_epoch, b)
    return table


def train_cohort(cm: CohortModel, x: torch.Tensor, y: torch.Tensor, ctx: RoundContext, tasks: list[ClientTask],
                 hp: ClientHParams, device: torch.device) -> list[ClientResult]:
    """``local_update`` for every task at once. ``tasks`` must be sorted by step count, largest first."""
    t0 = time.perf_counter()
    k_all = len(tasks)
    steps = [num_steps(len(t.indices), hp) for t in tasks]
    assert steps == sorted(steps, reverse=True), "cohort tasks must be sorted by step count, largest first"
    starts = [start_state(ctx, t, hp) for t in tasks]
    stacked = {k: torch.stack([s[k] for s in starts]).to(device) for k in cm.state_names}
    params = {k: stacked[k] for k in cm.param_names}
    optimizer = CohortOptimizer(params, hp.optimizer, hp.lr * ctx.lr_scale, hp.momentum, hp.weight_decay)
    objective = client_objective(hp)  # the same objective code as local_update, over [K, ...]
    owns = own_states(objective, ctx, tasks, cm.param_names)
    objective.begin(ClientSetup(
        params, {k: ctx.global_state[k].to(device) for k in cm.param_names},
        {k: v.to(device) for k, v in ctx.payload.items()},
        {k: torch.stack([o[k] for o in owns]).to(device) for k in owns[0]},
        label_counts(y.cpu(), tasks, hp).to(device)))
    seeds = [(ctx.round, t.client_id) for t in tasks]
    aug_gens = [torch.Generator().manual_seed(seeding.torch_seed(hp.seed, seeding.CLIENT, *s)) for s in seeds]
    drop_gens = [torch.Generator().manual_seed(seeding.torch_seed(hp.seed, seeding.TORCH, *s)) for s in seeds]

    table = torch.from_numpy(batch_table(ctx, tasks, hp))
    counts_all = (table >= 0).sum(2)  # [K, T_max]
    loss_sum = torch.zeros(k_all, dtype=torch.float64, device=device)
    _, c, h, w = x.shape
    b = hp.batch_size
    for t in range(table.shape[1]):
        a = sum(s > t for s in steps)
        rows = table[:a, t].to(device)
        counts = counts_all[:a, t].tolist()
        mask = None if min(counts) == b else (rows >= 0)
        xb = x[rows.clamp_min(0)]  # [A, B, C, H, W]
        yb = y[rows.clamp_min(0)]
        if mask is not None:
            xb = xb * mask.view(a, b, 1, 1, 1).to(xb.dtype)
        if hp.augment:
            theta = torch.zeros(a, b, 2, 3)
            for i in range(a):
                theta[i, : counts[i]] = affine_theta(counts[i], h, w, aug_gens[i], hp.augment_shift,
                                                     hp.augment_rotate)
            xb = apply_affine(xb.reshape(a * b, c, h, w), theta.view(a * b, 2, 3)).view(a, b, c, h, w)
        xb = xb.transpose(0, 1).reshape(b, a * c, h, w)
        if cm.channels_last:  # clone: a one-channel batch is "contiguous" in both layouts (see cohort_model)
            xb = xb.clone(memory_format=torch.channels_last)
        step = StepRows(a, b, counts, None if mask is None else mask.t(), drop_gens[:a])

        leaves = {k: p[:a].detach().requires_grad_(True) for k, p in params.items()}
        tensors = {**{k: v[:a] for k, v in stacked.items()}, **leaves}
        logits = cm.forward(tensors, xb, step)  # [A, B, classes]
        per_sample = objective.loss(logits, yb)  # [A, B]
        n_real = torch.tensor(counts, dtype=per_sample.dtype, device=device)
        loss = per_sample.mean(1) if mask is None else (per_sample * mask.to(per_sample.dtype)).sum(1) / n_real
        grads = dict(zip(leaves, torch.autograd.grad(loss.sum(), list(leaves.values())), strict=True))
        objective.correct(grads)
        optimizer.step(grads, a)
        loss_sum[:a] += loss.detach() * n_real

    outcome = objective.end(torch.tensor(steps, device=device))
    seconds = (time.perf_counter() - t0) / max(k_all, 1)  # the cohort's time, shared out
    results = []
    for k, task in enumerate(tasks):
        final = {name: stacked[name][k].detach().clone().cpu() for name in cm.state_names}
        new_own, upload = outcome.client(k)
        cpu = lambda state: {name: v.to("cpu", copy=True) for name, v in state.items()}  # noqa: E731 (not views)
        results.append(client_result(task, hp, final, float(loss_sum[k]), steps[k], cpu(new_own), cpu(upload),
                                     seconds))
    return results
