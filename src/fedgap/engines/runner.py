"""Client work inside one process: the piece every engine that runs clients one at a time is built from.

A ``ClientRunner`` holds the data set (loaded once per process and kept), one model instance reused for every
client, and the client hyper-parameters. The sequential engine has one in the main process, the parallel
engine one per worker process, the Ray engine one per actor. A runner never decides which clients run or how
their results are combined (that is the round loop's job), so it cannot change the math between engines.

Everything a runner returns is plain tensors and dataclasses: picklable, so it can cross a process boundary.
"""

from __future__ import annotations

import numpy as np
import torch

from fedgap.data.datasets import Dataset, load_dataset
from fedgap.engines.results import RoundOutput, failure_from_exception
from fedgap.fl.client import ClientHParams, ClientTask, RoundContext, local_update
from fedgap.fl.device import check_device
from fedgap.fl.evaluate import EvalResult, evaluate
from fedgap.fl.normpolicy import Moments, layer_input_moments
from fedgap.fl.state import State
from fedgap.models import build_model
from fedgap.models.norm import float_norm_keys


class ClientRunner:
    def __init__(self, cfg, data: Dataset | None = None, hp: ClientHParams | None = None):
        self.cfg = cfg
        self.data = data if data is not None else load_dataset(cfg.data.name, cfg.data.root, cfg.data.path)
        self.device = check_device(cfg.engine.device)
        self.model = prepare_model(build_model(cfg.model, self.data.image_shape, self.data.num_classes)
                                   .to(self.device), cfg)
        # the training set on the device, once (on cpu: the same tensors)
        self.train_x, self.train_y = self.data.train_x.to(self.device), self.data.train_y.to(self.device)
        self.hp = hp if hp is not None else ClientHParams.from_config(cfg, float_norm_keys(self.model),
                                                                         self.data.num_classes)

    def train(self, ctx: RoundContext, tasks: list[ClientTask]) -> RoundOutput:
        """Run the tasks one after another; a client that raises is reported as a failure, not fatal."""
        out = RoundOutput([])
        for task in tasks:
            try:
                out.results.append(local_update(self.model, self.train_x, self.train_y, ctx, task, self.hp))
            except Exception as exc:  # dropped from the round, as a failed device would be
                out.failures.append(failure_from_exception(task.client_id, exc))
        return out.in_client_order()

    def evaluate(self, state: State | None, x: torch.Tensor, y: torch.Tensor, *,
                 train_mode: bool = False) -> EvalResult:
        return evaluate(self.model, state, x, y, self.cfg.eval.batch_size, train_mode=train_mode,
                        channels_last=self.cfg.engine.channels_last)

    def evaluate_test_rows(self, state: State, start: int, stop: int, *, train_mode: bool = False) -> EvalResult:
        """Evaluation of test rows [start, stop): engines split the test set over workers this way and merge
        the parts with ``EvalResult.merge``."""
        return self.evaluate(state, self.data.test_x[start:stop], self.data.test_y[start:stop],
                             train_mode=train_mode)

    def layer_moments(self, state: State, layer: str, parts: list[np.ndarray]) -> list[Moments]:
        """Per-client moments of ``layer``'s input over each client's rows (one step of BN recalibration)."""
        return [layer_input_moments(self.model, state, self.train_x[torch.from_numpy(np.asarray(p))], layer)
                for p in parts]


def prepare_model(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """The CPU layout switches of ``engine.*``, none of which changes a number.

    - ``channels_last`` (NHWC): oneDNN's depthwise and 1x1 convolutions are faster in it (measured: 1-thread
      training of mobilenet-like +50%). The gradient that global average pooling (or a flatten) sends back is
      dense NCHW, though, and the first ReLU backward then mixes layouts, which takes a slow strided path
      (measured 3.4 ms against 0.07 ms for a 32x64x14x14 tensor); a hook hands it back in NHWC. A layout copy
      moves values without arithmetic, so results stay bit for bit the same.
    - ``compile``: ``torch.compile`` of the forward pass (off by default: it costs about a minute of compile
      time at start and after every new batch shape, and was no faster at batch 32 on CPU; it fuses kernels, so
      numbers change by float rounding).
    """
    if cfg.engine.channels_last:
        model.to(memory_format=torch.channels_last)
        for module in model.modules():
            if isinstance(module, (torch.nn.AdaptiveAvgPool2d, torch.nn.Flatten)):
                module.register_forward_pre_hook(_grad_to_channels_last)
    if cfg.engine.compile:
        model.compile()
    return model


def _to_channels_last(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous(memory_format=torch.channels_last)


def _grad_to_channels_last(_module, inputs):
    x = inputs[0]
    if x.requires_grad and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        x.register_hook(_to_channels_last)
