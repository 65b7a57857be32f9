"""The sequential engine: clients one after another in this process, one model instance reused throughout.

Data stay in memory as tensors and batches are gathered by index; the model is built once and only its state
is loaded per client. ``engine.threads`` sets PyTorch's intra-op threads (default: all cores).
"""

from __future__ import annotations

import os

import torch

from fedgap.engines.base import Engine, RoundOutput, failure_from_exception
from fedgap.fl.client import ClientTask, RoundContext, local_update
from fedgap.runtime import tune_allocator


class SequentialEngine(Engine):
    name = "sequential"

    def start(self) -> None:
        tune_allocator()
        torch.set_num_threads(self.cfg.engine.threads or os.cpu_count() or 1)
        if self.cfg.engine.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def train(self, ctx: RoundContext, tasks: list[ClientTask]) -> RoundOutput:
        out = RoundOutput([])
        for task in tasks:
            try:
                out.results.append(local_update(self.model, self.data.train_x, self.data.train_y, ctx, task, self.hp))
            except Exception as exc:  # a failing client is dropped from the round, as on a cluster
                out.failures.append(failure_from_exception(task.client_id, exc))
        out.results.sort(key=lambda r: r.client_id)
        return out
