"""The engine interface. An engine decides *how* client updates are executed (in this process, in worker
processes, batched into one model, on a Ray cluster); it never changes *what* is computed. The round loop hands
it a RoundContext and a list of ClientTasks and gets back one ClientResult per surviving client, sorted by
client id so aggregation order (and so every float) is the same whatever ran the clients.
"""

from __future__ import annotations

import os
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fedgap.data.datasets import Dataset
from fedgap.fl.client import ClientHParams, ClientResult, ClientTask, RoundContext
from fedgap.fl.evaluate import EvalResult, evaluate
from fedgap.fl.normpolicy import Moments, layer_input_moments
from fedgap.fl.state import State

ModelFactory = Callable[[], torch.nn.Module]


@dataclass
class ClientFailure:
    client_id: int
    reason: str  # one line: exception type and message


@dataclass
class RoundOutput:
    results: list[ClientResult]
    failures: list[ClientFailure] = field(default_factory=list)


def failure_from_exception(client_id: int, exc: BaseException) -> ClientFailure:
    if os.environ.get("FEDGAP_DEBUG"):
        traceback.print_exception(exc)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return ClientFailure(client_id, f"{type(exc).__name__}: {first}".rstrip(": "))


class Engine(ABC):
    name = "base"

    def __init__(self, cfg, data: Dataset, hp: ClientHParams, model_factory: ModelFactory):
        self.cfg = cfg
        self.data = data
        self.hp = hp
        self.model_factory = model_factory
        self._model: torch.nn.Module | None = None

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
    def model(self) -> torch.nn.Module:
        """A model instance in this process, for evaluation and statistics passes."""
        if self._model is None:
            self._model = self.model_factory()
        return self._model

    def evaluate(self, state: State, x: torch.Tensor, y: torch.Tensor, *, train_mode: bool = False) -> EvalResult:
        return evaluate(self.model, state, x, y, self.cfg.eval.batch_size, train_mode=train_mode,
                        channels_last=self.cfg.engine.channels_last)

    def layer_moments(self, state: State, layer: str, parts: list[np.ndarray]) -> list[Moments]:
        """Per-client moments of ``layer``'s input over each client's data (the recalibration pass)."""
        return [layer_input_moments(self.model, state, self.data.train_x[torch.from_numpy(p)], layer)
                for p in parts]
