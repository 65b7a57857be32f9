"""``fedgap export keras RUN_DIR --out model.keras``: a run's trained global model as a Keras file.

The model is the one the run evaluated last and would hand out: the checkpoint's global state, or under
``server.average`` the running average of the round models (``ServerState.evaluated()``, the model the round
loop evaluates). It is built from the run's ``config.yaml`` exactly as the run built it
(``model.norm``, ``model.bn_momentum`` / ``model.bn_eps`` included), loaded with that state, and written with
``keras.saving.save_model`` with its final softmax back on, so ``keras.models.load_model`` opens it under any
Keras backend. Its inputs are Keras' layout ([N, H, W, C] for channels_last) standardized as fedgap
standardized the run's data: per channel, (x / 255 - mean) / std for 8-bit images (``Dataset.mean`` / ``std``).

Only a Keras model exports to Keras; a torch model is refused in one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fedgap import seeding
from fedgap.config import load_config
from fedgap.data.datasets import load_dataset_for
from fedgap.errors import FedgapError
from fedgap.experiment import outputs
from fedgap.experiment.checkpoint import read as read_checkpoint
from fedgap.files import check_file
from fedgap.models import build_model
from fedgap.models.keras_adapter import KerasModel


@dataclass(frozen=True)
class KerasExport:
    path: Path
    rounds: int  # the rounds the exported model was trained for
    averaged: bool  # the running average of the round models (server.average)
    mean: tuple[float, ...]  # the standardization its inputs need, per channel (8-bit images on the [0, 1] scale)
    std: tuple[float, ...]


def export_keras(run_dir: Path, out: Path, *, overwrite: bool = False) -> KerasExport:
    config, checkpoint = run_dir / outputs.CONFIG, run_dir / outputs.CHECKPOINT
    for path in (config, checkpoint):
        if not path.is_file():
            raise FedgapError(f"RUN_DIR '{run_dir}': no {path.name} (the folder of a `fedgap run --out`)")
    if out.suffix != ".keras":
        raise FedgapError(f"--out '{out}': a Keras file name ends in .keras")
    if out.exists() and not overwrite:
        raise FedgapError(f"--out '{out}': exists; pass --overwrite to replace it")
    check_file(out, "--out")
    cfg = load_config(config)
    data = load_dataset_for(cfg.data)
    with torch.random.fork_rng(devices=[]):  # the run's initial weights, although the checkpoint replaces them
        torch.manual_seed(seeding.torch_seed(cfg.seed, seeding.INIT))
        model = build_model(cfg.model, data.image_shape, data.num_classes)
    if not isinstance(model, KerasModel):
        raise FedgapError(f"RUN_DIR '{run_dir}': model.name={cfg.model.name} is a torch model; only Keras models "
                          "export to Keras")
    saved = read_checkpoint(checkpoint)
    model.load_state_dict(saved.server.evaluated())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.keras")  # written whole, then renamed: never torn
    try:
        model.save_keras(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return KerasExport(out, saved.round, saved.server.average is not None, tuple(data.mean), tuple(data.std))
