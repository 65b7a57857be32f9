"""``fedgap export flower``: write a Flower app (flwr 1.42, message API) that runs a fedgap config.

The app is small on purpose: ``<pkg>/client_app.py`` and ``<pkg>/server_app.py`` only wire Flower's
``ClientApp`` / ``ServerApp`` to ``fedgap.export.flower_app``, which calls fedgap's own code (the client
update ``fedgap.fl.client.local_update``; the round loop's aggregation, server optimizer and evaluation). One
copy of the math: the app depends on fedgap. Beside it go the resolved ``config.yaml`` and ``partition.npz``
(client id -> its training rows, from ``fedgap.data.partition.partition_for``) and ``superlink.toml``, the
SuperLink connection for the ``flwr`` CLI (address, and the CA certificate for TLS). The file texts are in
``fedgap.export.flower_files``; what may be written into an existing ``--out`` is ``fedgap.export.folder``'s rule.

What cannot be exported is refused with one line: ``model.norm_policy=recalibrate`` (exact BatchNorm
statistics need a federated statistics pass per layer after every round) and ``eval.stop_at_target`` (the
Flower strategy runs a fixed number of rounds). Per-client state across rounds (SCAFFOLD's control variates,
FedBN's local norm layers: whatever ``local_update`` returns as the client's own state) is exported: it stays
on the client, in the ClientApp's ``context.state``.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from fedgap.config import Config, config_from_dict, config_to_dict, dump_yaml
from fedgap.errors import ConfigError
from fedgap.experiment import outputs
from fedgap.export.flower_files import (
    CLIENT_APP,
    CONNECTION,
    DEFAULT_SUPERLINK,
    PACKAGE,
    REPLY_TIMEOUT,
    SERVER_APP,
    connection,
    pyproject,
    readme,
)
from fedgap.export.folder import check_out, write_export

NOT_EXPORTABLE = {  # (section, key, value) -> why
    ("model", "norm_policy", "recalibrate"): (
        "model.norm_policy: recalibrate cannot be exported to Flower (exact BatchNorm statistics need a "
        "federated statistics pass per layer after every round); use average or local"),
    ("eval", "stop_at_target", True): (
        "eval.stop_at_target: cannot be exported to Flower (the Flower strategy runs server.rounds rounds); "
        "set eval.stop_at_target=false"),
}


def check_exportable(cfg: Config) -> None:
    for (section, key, value), why in NOT_EXPORTABLE.items():
        if getattr(getattr(cfg, section), key) == value:
            raise ConfigError(why)


def exported_config(cfg: Config) -> Config:
    """The config the app runs: Flower is the engine, so fedgap's own engine runs only the server's
    evaluation, in-process (``engine.*`` never changes a number); tracking stays with fedgap runs."""
    tree = config_to_dict(cfg)
    tree["engine"]["name"] = "sequential"
    tree["track"] = {}
    return config_from_dict(tree)


def export_flower(cfg: Config, out: Path, *, name: str | None = None, superlink: str = DEFAULT_SUPERLINK,
                  root_certificates: Path | None = None, overwrite: bool = False) -> Path:
    """Write the app to ``out``; returns ``out``. Into an existing folder only as ``fedgap.export.folder``
    allows (an earlier export, or ``overwrite``); every check runs before anything is written."""
    check_exportable(cfg)
    check_superlink(superlink)
    if root_certificates is not None:
        check_certificate(root_certificates)
    from fedgap.data.datasets import load_dataset
    from fedgap.data.partition import partition_for

    data = load_dataset(cfg.data.name, cfg.data.root)  # a bad data setting fails before --out is touched
    parts = partition_for(cfg.data, data.train_y.numpy(), cfg.seed)
    app_name = name or _project_name(out)
    cfg = exported_config(cfg)
    files = {
        "config.yaml": dump_yaml(cfg),
        "partition.npz": partition_bytes(parts),
        f"{PACKAGE}/__init__.py": f'"""{app_name}: a fedgap experiment as a Flower app."""\n',
        f"{PACKAGE}/client_app.py": CLIENT_APP,
        f"{PACKAGE}/server_app.py": SERVER_APP,
        "pyproject.toml": pyproject(app_name, cfg, out, REPLY_TIMEOUT),
        CONNECTION: connection(app_name, superlink, root_certificates),
        "README.md": readme(app_name, cfg, superlink),
    }
    check_out(out, list(files), overwrite=overwrite)
    outputs.prepare_dir(out)
    write_export(out, {k: v.encode() if isinstance(v, str) else v for k, v in files.items()})
    return out


def check_superlink(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--superlink '{address}': expected HOST:PORT (e.g. {DEFAULT_SUPERLINK})")


def check_certificate(path: Path) -> None:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--root-certificates '{path}': cannot be read ({exc.strerror or type(exc).__name__})") \
            from None
    if b"-----BEGIN CERTIFICATE-----" not in text:
        raise ConfigError(f"--root-certificates '{path}': not a PEM certificate (no BEGIN CERTIFICATE line)")


def partition_bytes(parts: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{f"client_{i}": np.asarray(p, dtype=np.int64) for i, p in enumerate(parts)})
    return buf.getvalue()


def load_partition(path: Path) -> dict[int, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {int(k.split("_", 1)[1]): npz[k] for k in npz.files}


def _project_name(out: Path) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", out.resolve().name.lower()).strip("-")
    return slug if slug and slug[0].isalpha() else f"fedgap-{slug or 'app'}"
