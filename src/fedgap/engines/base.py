"""The engine interface. An engine decides *how* client updates are executed (in this process, in worker
processes, batched into one model, on a Ray cluster); it never changes *what* is computed. The round loop hands
it a RoundContext and a list of ClientTasks and gets back one ClientResult per surviving client, sorted by
client id so aggregation order (and so every float) is the same whatever ran the clients.

Every engine also has a ``local`` ClientRunner in the main process. Evaluation and the BatchNorm
recalibration pass run there by default; an engine with workers may distribute them instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from fedgap.data.datasets import Dataset
from fedgap.engines.results import ClientFailure, RoundOutput, failure_from_exception
from fedgap.engines.runner import ClientRunner
from fedgap.fl.client import ClientHParams, ClientTask, RoundContext
from fedgap.fl.evaluate import EvalResult
from fedgap.fl.normpolicy import Moments
from fedgap.fl.state import State

__all__ = ["ClientFailure", "Engine", "RoundOutput", "failure_from_exception"]


class Engine(ABC):
    name = "base"

    def __init__(self, cfg, data: Dataset, hp: ClientHParams):
        self.cfg = cfg
        self.data = data
        self.hp = hp
        self._local: ClientRunner | None = None

    # ---- lifecycle
    def start(self) -> None:
        """Acquire workers, threads, devices. Called once before the first round."""

    def close(self) -> None:
        """Release what start() acquired. Safe to call twice."""

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the one thing every engine must do
    @abstractmethod
    def train(self, ctx: RoundContext, tasks: list[ClientTask]) -> RoundOutput:
        """Run every task's local update; return the survivors' results sorted by client id."""

    # ---- defaults that run in this process; engines may distribute them
    @property
    def local(self) -> ClientRunner:
        """The runner in this process (built on first use)."""
        if self._local is None:
            self._local = ClientRunner(self.cfg, self.data, self.hp)
        return self._local

    @property
    def model(self) -> torch.nn.Module:
        """A model instance in this process, for evaluation and statistics passes."""
        return self.local.model

    def evaluate(self, state: State, x: torch.Tensor, y: torch.Tensor, *, train_mode: bool = False) -> EvalResult:
        return self.local.evaluate(state, x, y, train_mode=train_mode)

    def evaluate_test(self, state: State, *, train_mode: bool = False) -> EvalResult:
        """The global model on the whole test set (engines with workers split it over them)."""
        return self.evaluate(state, self.data.test_x, self.data.test_y, train_mode=train_mode)

    def layer_moments(self, state: State, layer: str, parts: list[np.ndarray]) -> list[Moments]:
        """Per-client moments of ``layer``'s input over each client's data (the recalibration pass)."""
        return self.local.layer_moments(state, layer, parts)
