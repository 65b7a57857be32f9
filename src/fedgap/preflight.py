"""Load a config's data set and build its model once, before anything is written: every error in the user's
inputs (a bad data file, a model factory that raises or returns the wrong logits, GroupNorm groups that do not
divide a layer of the user's model) is then one line, and an output folder is never left half-written.

A run does this on its own (``Experiment`` loads the data before touching --out and fails on the model before
writing a file); the doctor and ``fedgap model-info`` call ``check_inputs``. The data set is cached per process
(``load_dataset``), so the later runs do not read it again.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from fedgap import seeding
from fedgap.data.datasets import Dataset, load_dataset_for
from fedgap.models import build_model_reported
from fedgap.models.convert import Replacement
from fedgap.models.custom import probe_import
from fedgap.models.registry import is_import_path

_probed: set[tuple[str, int]] = set()


def probe_user_model(cfg) -> None:
    """A user's model module is imported in a child process before this one imports it, once per file version
    (``fedgap.models.custom.probe_import``): a module that ends the interpreter is then one line, not silence."""
    name = cfg.model.name
    if not is_import_path(name):
        return
    where = name.rpartition(":")[0]
    key = (name, os.stat(where).st_mtime_ns if os.path.isfile(where) else 0)
    if key not in _probed:
        probe_import(name)
        _probed.add(key)


def check_inputs(cfg) -> tuple[Dataset, nn.Module, list[Replacement]]:
    """The data set, the model as a run initializes it, and the norm layers ``model.norm`` replaced in it.
    Torch's global RNG is left as it was."""
    probe_user_model(cfg)
    data = load_dataset_for(cfg.data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeding.torch_seed(cfg.seed, seeding.INIT))
        model, replaced = build_model_reported(cfg.model, data.image_shape, data.num_classes)
    return data, model, replaced
