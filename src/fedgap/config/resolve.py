"""Cross-key rules of a config: the preset fills what the user left open (``server.algorithm`` decides the
client objective, the server optimizer and the norm policy unless given), and constraints that span several keys
are checked, each failure one line naming the key. Runs inside validation (``Config``'s model validator), on
every load, so ``config.yaml`` written with a run is fully resolved and repeats the run when fed back.

Torch-free: a user's model is checked here only for the form of its import path and that its file or top-level
package exists; importing and calling the factory happens where models are built (``fedgap.models``), before any
output is written.
"""

from __future__ import annotations

import importlib.util
import os

from fedgap.errors import ConfigError
from fedgap.fl.presets import PRESETS
from fedgap.fl.server import SERVER_OPTIMIZERS
from fedgap.models.registry import MODELS, absolute_target, is_file_path, split_target


def resolve(cfg) -> None:
    """Fill preset defaults and check constraints that span several keys."""
    if cfg.data.partition == "central":
        # Centralized training is the same loop with one client holding everything, full participation.
        cfg.data.num_clients = 1
        cfg.server.clients_per_round = 1
    preset = PRESETS[cfg.server.algorithm]
    if cfg.client.objective is None:
        cfg.client.objective = preset.objective
    if cfg.server.optimizer is None:
        cfg.server.optimizer = preset.server_optimizer
    if cfg.model.norm_policy is None:
        cfg.model.norm_policy = preset.norm_policy
    if preset.normalized and cfg.client.optimizer != "sgd":  # a_i is defined for SGD steps (fedgap.fl.fednova)
        raise ValueError(f"client.optimizer: server.algorithm={cfg.server.algorithm} normalizes by the clients' "
                         f"SGD steps and needs sgd, got {cfg.client.optimizer}")
    server_opt = SERVER_OPTIMIZERS[cfg.server.optimizer]
    if cfg.server.lr is None:
        cfg.server.lr = server_opt.default_lr
    if cfg.server.momentum is None:
        cfg.server.momentum = server_opt.default_momentum

    if cfg.server.clients_per_round > cfg.data.num_clients:
        raise ValueError(
            f"server.clients_per_round: must be <= data.num_clients ({cfg.data.num_clients}), "
            f"got {cfg.server.clients_per_round}"
        )
    if cfg.server.min_clients > cfg.server.clients_per_round:
        raise ValueError(
            f"server.min_clients: must be <= server.clients_per_round ({cfg.server.clients_per_round}), "
            f"got {cfg.server.min_clients}"
        )
    for key in ("fail_clients", "crash_clients"):
        bad = [c for c in getattr(cfg.engine, key) if not 0 <= c < cfg.data.num_clients]
        if bad:
            raise ValueError(f"engine.{key}: client ids must be in 0..{cfg.data.num_clients - 1} "
                             f"(data.num_clients={cfg.data.num_clients}), got {bad}")
    _check_data(cfg.data)
    _check_model(cfg.model)
    if cfg.model.norm_policy == "recalibrate" and cfg.model.norm != "batch":
        raise ValueError(
            f"model.norm_policy: recalibrate needs model.norm=batch (running statistics), got {cfg.model.norm}"
        )


def _check_data(d) -> None:
    if d.name in ("idx", "folder") and not d.root:
        what = "a folder with the four IDX files" if d.name == "idx" else "a folder with train/CLASS and test/CLASS"
        raise ValueError(f"data.root: required when data.name={d.name} ({what})")
    if d.name == "npz" and not d.path:
        raise ValueError("data.path: required when data.name=npz (a .npz file with x_train, y_train, x_test, y_test)")
    if d.path is not None and d.name != "npz":
        raise ValueError(f"data.path: only read when data.name=npz, got data.name={d.name}")
    if d.path is not None:
        absolute = os.path.abspath(os.path.expanduser(d.path))
        if absolute != d.path:
            d.path = absolute  # every process (and a --resume from another folder) reads the same file


def _check_model(m) -> None:
    entry = MODELS.get(m.name)
    if entry is None:  # the user's factory: its norm layers are checked when it is built (needs torch)
        for key, default in (("dropout", 0.0), ("width", 1.0)):
            if getattr(m, key) != default:
                raise ValueError(f"model.{key}: only the built-in models take it; pass your factory's own "
                                 f"options as model.kwargs.NAME=VALUE")
        return
    if m.kwargs:
        raise ValueError(f"model.kwargs: only a model from an import path takes kwargs, not {m.name}")
    if not entry.norm_channels(m.width):  # no norm layers (simple-cnn): the norm key has nothing to act on
        if m.norm != "none" and "norm" in m.model_fields_set:
            raise ValueError(f"model.norm: {m.name} has no norm layers, so only none applies, got {m.norm}")
        m.norm = "none"
    if m.norm == "group":
        bad = sorted({c for c in entry.norm_channels(m.width) if c % m.groups})
        if bad:
            raise ValueError(
                f"model.groups: {m.groups} does not divide the channel counts {bad} of "
                f"{m.name}; choose a divisor of all of them"
            )



def check_import_path(name: str) -> str:
    """A user's ``model.name`` with a file path made absolute (so every process and a later --resume find the same
    file); a one-line ConfigError when the form is wrong, the file is missing or no top-level package of that
    name can be found (nothing is imported)."""
    where, _ = split_target(name)
    if is_file_path(where):
        name = absolute_target(name)
        path = name.rpartition(":")[0]
        if not os.path.isfile(path):
            raise ConfigError(f"model.name: file '{path}' not found")
        return name
    top = where.split(".")[0]
    in_cwd = os.path.isfile(f"{top}.py") or os.path.isdir(top)  # as the import falls back to the current folder
    if not in_cwd and importlib.util.find_spec(top) is None:
        raise ConfigError(f"model.name: no module named {where!r} (is it installed or on PYTHONPATH?)")
    return name
