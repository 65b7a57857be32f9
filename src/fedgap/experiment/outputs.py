"""A run's files: config.yaml, metrics.csv, summary.json and checkpoint.pt, each written atomically (to a
temporary file in the same folder, then renamed), so a kill at any moment leaves either the old or the new
version of a file, never a torn one. A run is finished exactly when summary.json exists.
"""

from __future__ import annotations

import csv
import fcntl
import io
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from fedgap.errors import FedgapError
from fedgap.files import atomic_write_bytes, atomic_write_text, write_json  # noqa: F401 (callers write through outputs)

CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.yaml", "metrics.csv", "summary.json", "checkpoint.pt"
RUN_FILES = (CONFIG, METRICS, SUMMARY, CHECKPOINT)


# metrics.csv columns that DESIGN.md promises, in this order; more may follow.
BASE_COLUMNS = ["round", "test_accuracy", "test_loss", "train_loss", "seconds", "samples"]


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(BASE_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint without running code: ``weights_only=True`` lets torch's unpickler build tensors,
    containers and plain numbers only, so a checkpoint.pt from someone else (a shared run folder, a copied
    doctor cache) whose pickle would call a function is refused instead of executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FedgapError(f"--resume: no checkpoint at '{path}'") from None
    except pickle.UnpicklingError:
        raise FedgapError(f"checkpoint '{path}': refused, it holds objects other than tensors and plain values "
                          f"(loading it could run code); start a new --out") from None
    except Exception as exc:  # a torn or foreign file
        raise FedgapError(f"checkpoint '{path}': cannot be read ({type(exc).__name__})") from None


LOCK = ".lock"


class RunLock:
    """An exclusive lock on a run folder for as long as a process works in it, so two processes (a doctor and
    its re-run, two sweeps) never write one run. The kernel drops it when the process dies, however it dies."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise FedgapError(f"--out '{out}': another fedgap process is working in this folder") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.release()


def prepare_dir(out: Path) -> None:
    """Create the folder ``out`` and check that it is writable: a one-line error before any work starts."""
    if out.exists() and not out.is_dir():
        raise FedgapError(f"--out '{out}': exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise FedgapError(f"--out '{out}': not writable ({exc.strerror or type(exc).__name__})") from None


def lock_dir(out: Path) -> RunLock:
    """Create ``out`` if needed and lock it before anything else is written there, then check it is writable: a
    second process finds the folder locked and leaves without touching it. The caller holds the lock."""
    if out.exists() and not out.is_dir():
        raise FedgapError(f"--out '{out}': exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out)
    except OSError as exc:
        raise FedgapError(f"--out '{out}': not writable ({exc.strerror or type(exc).__name__})") from None
    try:
        prepare_dir(out)
    except BaseException:
        lock.release()
        raise
    return lock


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Create ``out`` (or check it for resume), lock it and make sure it is writable, before any work starts.
    The caller holds the returned lock until the run ends."""
    lock = lock_dir(out)
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if resume:
        return lock
    if existing and not overwrite:
        lock.release()
        finished = (out / SUMMARY).exists()
        what = "a finished run" if finished else "an unfinished run"
        hint = "choose another --out or pass --overwrite" if finished else "continue it with --resume, or --overwrite"
        raise FedgapError(f"--out '{out}': already holds {what}; {hint}")
    for name in existing:
        (out / name).unlink()
    return lock
