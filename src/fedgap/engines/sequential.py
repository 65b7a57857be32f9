"""The sequential engine: clients one after another in this process, one model instance reused throughout.

Data stay in memory as tensors and batches are gathered by index; the model is built once and only its state
is loaded per client. ``engine.threads`` sets PyTorch's intra-op threads (default: all cores).
"""

from __future__ import annotations

import os

import torch

from fedgap.engines.base import Engine, RoundOutput
from fedgap.fl.client import ClientTask, RoundContext
from fedgap.runtime import tune_allocator


class SequentialEngine(Engine):
    name = "sequential"

    def start(self) -> None:
        tune_allocator()
        torch.set_num_threads(self.cfg.engine.threads or os.cpu_count() or 1)

    def train(self, ctx: RoundContext, tasks: list[ClientTask]) -> RoundOutput:
        return self.local.train(ctx, tasks)
