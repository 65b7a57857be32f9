"""Where a client trains (``engine.device``): the model, its data batches and the optimizer state live on the
device; everything that leaves a client (its final state, what it keeps, what it uploads, BatchNorm moments) is
moved back to the CPU, where the round loop aggregates in float64 whatever trained it.

On ``cpu`` (the default) every move here is a no-op that returns the same tensor: numbers are bit for bit those
of a run that never named a device. On ``cuda`` a float32 result differs from the CPU's by rounding (other
kernels reduce in another order; docs/ray.md states the tolerance ``benchmarks/gpu_check.sh`` checks).
"""

from __future__ import annotations

import torch

from fedgap.errors import ConfigError
from fedgap.fl.state import State


def check_device(name: str) -> torch.device:
    """``engine.device`` as a torch device, or one line saying why this machine cannot train on it."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"engine.device: {name!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"engine.device: {name!r}: fedgap trains on cpu or cuda")
    if not torch.cuda.is_available():
        raise ConfigError(f"engine.device: {name!r}, but torch {torch.__version__} sees no CUDA GPU on this machine "
                          f"(use engine.device=cpu)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"engine.device: {name!r}, but this machine has {torch.cuda.device_count()} CUDA GPUs")
    return device


def to_device(state: State, device: torch.device) -> State:
    """A state's tensors on ``device`` (the same tensors when they are already there)."""
    return {k: v.to(device) for k, v in state.items()}


def to_cpu(state: State) -> State:
    """A state's tensors on the CPU, never views of the device's (or the model's) memory."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters are on (``engine.device``; cpu for a model without parameters): where
    evaluation and BatchNorm passes send their batches."""
    return next(model.parameters(), torch.empty(0)).device


def seed_device(device: torch.device, seed: int) -> None:
    """Seed the generator random draws on ``device`` use (dropout on cuda draws from the GPU's own generator)."""
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


__all__ = ["check_device", "model_device", "seed_device", "to_cpu", "to_device"]
