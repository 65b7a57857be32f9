"""The folder an export writes into: nothing of the user's is replaced without ``--overwrite``.

An export records what it wrote in ``.fedgap-export.json`` (each file's SHA-256). Writing into ``--out`` is
allowed when the folder

- does not exist or is empty, or
- is an earlier export whose files are as that export wrote them: they are regenerated from the config, so
  replacing them loses nothing; files it did not write (a ``flower-run/`` of results, notes) are left alone.

Anything else is refused in one line naming ``--overwrite``: a non-empty folder that is not an earlier export,
an app file edited since the export, a file of the user's named like one of the app's. With ``--overwrite``
the app's files are written over whatever holds their names; other files are still left alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedgap.errors import FedgapError
from fedgap.files import atomic_write_bytes, write_json

MANIFEST = ".fedgap-export.json"


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def earlier_export(out: Path) -> dict[str, str] | None:
    """relative path -> SHA-256 of the files an earlier export wrote into ``out``; None if it is not one."""
    try:
        files = json.loads((out / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def check_out(out: Path, names: list[str], *, overwrite: bool) -> None:
    """Raise a one-line FedgapError unless the files ``names`` may be written into ``out`` (module docstring)."""
    if out.exists() and not out.is_dir():
        raise FedgapError(f"--out '{out}': exists and is not a folder")
    if overwrite or not out.exists():
        return
    held = sorted(p.name for p in out.iterdir())
    if not held:
        return
    earlier = earlier_export(out)
    if earlier is None:
        raise FedgapError(f"--out '{out}': not empty and not an earlier fedgap export (it holds '{held[0]}'); "
                          "choose a new or empty folder, or pass --overwrite to write the app into it")
    for name in names:
        path = out / name
        if not path.exists():
            continue
        if name not in earlier:
            raise FedgapError(f"--out '{out}': '{name}' is not from the earlier export; pass --overwrite to replace it")
        if not path.is_file() or digest(path.read_bytes()) != earlier[name]:
            raise FedgapError(f"--out '{out}': '{name}' was changed since it was exported; pass --overwrite to "
                              "replace it")


def write_export(out: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (relative path -> bytes, each atomically) and then the manifest that records them."""
    for name, payload in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / name, payload)
    from fedgap import __version__

    write_json(out / MANIFEST, {"fedgap": __version__, "files": {k: digest(v) for k, v in files.items()}})
