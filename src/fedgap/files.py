"""Atomic file writes (to a temporary file in the same folder, then renamed): a kill at any moment leaves the
old or the new file, never a torn one; and checks that an output path can be written, made before any work
starts. A leaf module: run files, trackers and reports all write through it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(_json_safe(data), indent=2) + "\n")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def check_folder(path: str | Path, what: str) -> None:
    """``path`` is a folder, or one can be made there: a one-line FedgapError naming ``what`` (the key or option)
    otherwise: a file in the way, a parent that is a file, a parent that cannot be written. Nothing is created,
    so an output path is checked before any work starts."""
    from fedgap.errors import FedgapError

    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FedgapError(f"{what} '{path}': exists and is not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise FedgapError(f"{what} '{path}': the folder is not writable")
        return
    parent = next(a for a in p.absolute().parents if a.exists())
    if not parent.is_dir():
        raise FedgapError(f"{what} '{path}': cannot be created, '{parent}' is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FedgapError(f"{what} '{path}': cannot be created, '{parent}' is not writable")


def check_file(path: str | Path, what: str) -> None:
    """A file can be written at ``path`` (an existing file is replaced; a folder there, or a parent that cannot be
    made, is a one-line FedgapError naming ``what``). Nothing is created."""
    from fedgap.errors import FedgapError

    p = Path(path).expanduser()
    if p.is_dir():
        raise FedgapError(f"{what} '{path}': is a folder, not a file")
    check_folder(p.absolute().parent, what)
