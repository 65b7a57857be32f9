"""The user's own model: ``model.name=package.module:factory`` or ``model.name=path/to/file.py:factory``.

``factory(num_classes, in_channels, image_size, **model.kwargs)`` must return an ``nn.Module`` mapping a batch
[N, in_channels, H, W] to logits [N, num_classes], or a ``keras.Model`` (Keras 3; fedgap sets the torch backend
before importing the user's code and adapts the model, ``fedgap.models.keras_adapter``).

Every process that builds the model (the main one, parallel workers whether forked or spawned, Ray actors)
resolves the path itself, so nothing about the model has to be
pickled; a file is imported under a name derived from its absolute path and registered in ``sys.modules``, so
classes defined in it pickle and unpickle within a process tree that imported it.

Everything that can go wrong is a one-line ``ConfigError`` naming ``model.name`` and the problem: a missing
module or file, a missing or non-callable attribute, a factory that raises, a result that is not a module or
whose logits have the wrong shape (one dummy forward of a batch of 2 in eval mode).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fedgap.errors import ConfigError
from fedgap.models.keras_backend import is_keras_object, use_torch_backend
from fedgap.models.registry import is_file_path, split_target


def resolve(name: str) -> Callable[..., nn.Module]:
    """The factory function that ``name`` points at."""
    where, attr = split_target(name)
    use_torch_backend()  # the user's code may import keras: on the torch backend
    module = _import_file(Path(where).expanduser()) if is_file_path(where) else _import_module(where)
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(f"model.name: '{where}' has no function {attr!r}")
    if not callable(factory):
        raise ConfigError(f"model.name: {attr!r} in '{where}' is not callable")
    return factory


def _import_module(where: str):
    """Import ``where`` from sys.path, else from the current folder (as ``python -m`` would find it, although
    the ``fedgap`` script's sys.path does not hold the current folder)."""
    try:
        try:
            return importlib.import_module(where)
        except ModuleNotFoundError as exc:
            if exc.name != where.split(".")[0] or os.getcwd() in sys.path:
                raise
            sys.path.insert(0, os.getcwd())
            try:
                return importlib.import_module(where)
            finally:
                sys.path.remove(os.getcwd())
    except ModuleNotFoundError as exc:
        if exc.name and where.startswith(exc.name):
            raise ConfigError(f"model.name: no module named {where!r} (is it installed or on PYTHONPATH?)") from None
        raise ConfigError(f"model.name: importing {where!r} failed: no module named {exc.name!r}") from None
    except (Exception, SystemExit) as exc:
        raise ConfigError(f"model.name: importing {where!r} failed: {_one_line(exc)}") from None


def _import_file(path: Path):
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"model.name: file '{path}' not found")
    module_name = "fedgap_user_" + path.stem.replace("-", "_") + "_" + hashlib.sha1(str(path).encode()).hexdigest()[:8]
    mtime = path.stat().st_mtime_ns
    cached = sys.modules.get(module_name)
    if cached is not None and getattr(cached, "__fedgap_mtime__", None) == mtime:
        return cached
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"model.name: '{path}' cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # sys.exit() in the user's module ends fedgap with one line, not silently
        del sys.modules[module_name]
        raise ConfigError(f"model.name: importing '{path}' failed: {_one_line(exc)}") from None
    module.__fedgap_mtime__ = mtime
    return module


def call_factory(factory: Callable[..., nn.Module], name: str, num_classes: int, in_channels: int,
                 image_size: tuple[int, int], kwargs: dict) -> nn.Module:
    """``factory``'s model (``factory = resolve(name)``), a torch module or a Keras object (unchecked: the
    caller adapts a Keras model, converts its norm layers, then calls ``check_output``)."""
    try:
        model = factory(num_classes, in_channels, tuple(image_size), **kwargs)
    except (Exception, SystemExit) as exc:
        raise ConfigError(f"model.name: {name} raised {_one_line(exc)}") from None
    if not isinstance(model, nn.Module) and not is_keras_object(model):
        raise ConfigError(f"model.name: {name} returned {type(model).__name__}, not a torch.nn.Module or a "
                          "keras.Model")
    return model


def check_output(model: nn.Module, name: str, num_classes: int, in_channels: int,
                 image_size: tuple[int, int]) -> None:
    """Logits of shape [2, num_classes] for a batch of 2 zero images; the model's mode and state are restored
    (eval mode: BatchNorm running statistics are not touched)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, in_channels, *image_size))
    except Exception as exc:
        raise ConfigError(f"model.name: {name} fails on a batch of 2 images [2, {in_channels}, {image_size[0]}, "
                          f"{image_size[1]}]: {_one_line(exc)}") from None
    finally:
        model.train(was_training)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, num_classes):
        raise ConfigError(f"model.name: {name} gives output {shape} for a batch of 2 images, expected logits "
                          f"(2, {num_classes})")


def probe_import(name: str, timeout: float = 300.0) -> None:
    """Import the user's module in a child process first: a module that ends the interpreter at import
    (``os._exit``, a crash in native code, a signal) would otherwise end fedgap without a word. The child's end is
    reported in one line; any other problem (an exception, ``sys.exit``) is left to the import in this process,
    which reports it in one line itself. Costs a Python start and the module's imports (about 2 s with torch)."""
    where, _ = split_target(name)
    code = ("import sys\nfrom fedgap.models.custom import resolve\ntry:\n    resolve(sys.argv[1])\n"
            "except BaseException:\n    pass\n")
    try:
        done = subprocess.run([sys.executable, "-c", code, name], capture_output=True, timeout=timeout,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        raise ConfigError(f"model.name: importing '{where}' did not finish within {timeout:.0f} s") from None
    if done.returncode < 0:
        how = signal.Signals(-done.returncode).name
        raise ConfigError(f"model.name: importing '{where}' crashed the Python process ({how})")
    if done.returncode != 0:
        raise ConfigError(f"model.name: importing '{where}' ended the Python process (exit code {done.returncode})")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
