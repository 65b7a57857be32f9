"""A run's checkpoint: its one server state (``fedgap.fl.aggregate.ServerState``), the round it ended, its metrics
rows and wall time, and the config hash that a resumption must match. Written atomically; read back without
running code (``outputs.load_checkpoint``: ``weights_only=True``).

Format 2 stores the server state as one entry; format 1 (before the state was one object) is still read, so runs
cached by an earlier fedgap resume and extend as they did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgap.config import RESULT_NEUTRAL, Config, config_hash, config_to_dict
from fedgap.errors import FedgapError
from fedgap.experiment import outputs
from fedgap.fl.aggregate import ServerState

FORMAT = 2


@dataclass
class Saved:
    round: int
    server: ServerState
    rows: list[dict[str, Any]]
    wall: float  # wall seconds of the rounds so far


def resume_hash(cfg: Config) -> str:
    """What must not change between a run and its resumption (more rounds are allowed)."""
    return config_hash(cfg, exclude=RESULT_NEUTRAL + (("server", "rounds"), ("eval", "every")))


def save(out: Path, cfg: Config, round_: int, server: ServerState, rows: list[dict[str, Any]], wall: float) -> None:
    outputs.save_checkpoint(out / outputs.CHECKPOINT, {
        "format": FORMAT, "config": config_to_dict(cfg), "resume_hash": resume_hash(cfg), "round": round_,
        "server": server.to_dict(), "rows": rows, "wall_seconds": wall})


def load(out: Path, cfg: Config) -> Saved:
    """The checkpoint in run folder ``out``, for resuming it with ``cfg`` (which must match the run's)."""
    path = out / outputs.CHECKPOINT
    ckpt = _read(path)
    if ckpt["resume_hash"] != resume_hash(cfg):
        raise FedgapError(
            f"--resume: the config differs from the one of the run in '{out}' (only server.rounds, "
            f"eval.every, engine.* and checkpoint.* may change); start a new --out instead"
        )
    return _saved(ckpt)


def read(path: Path) -> Saved:
    """A checkpoint as it is (to export its model, say), whatever config would resume it."""
    return _saved(_read(path))


def _read(path: Path) -> dict[str, Any]:
    ckpt = outputs.load_checkpoint(path)
    if ckpt.get("format") not in (1, FORMAT):
        raise FedgapError(f"checkpoint '{path}': written by another fedgap version")
    return ckpt


def _saved(ckpt: dict[str, Any]) -> Saved:
    if ckpt["format"] == 1:  # the server state as separate entries; "average" absent before server.average
        server = ServerState(ckpt["state"], ckpt["server_state"], ckpt["objective_state"], ckpt["client_store"],
                             ckpt.get("average"))
    else:
        server = ServerState.from_dict(ckpt["server"])
    return Saved(ckpt["round"], server, ckpt["rows"], ckpt["wall_seconds"])
