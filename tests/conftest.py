"""Shared fixtures. Tests run on the real shipped MNIST; the data set is loaded once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("FEDGAP_NO_DOWNLOAD", "1")  # tests never touch the network

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist():
    from fedgap.data.datasets import load_dataset

    return load_dataset("mnist")


def cli(*args: str, capsys=None) -> tuple[int, str, str]:
    """Run the fedgap CLI in this process; returns (exit code, stdout, stderr)."""
    from fedgap.cli import main

    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def cli_subprocess(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m fedgap`` as a separate process (the real entry point, real exit codes)."""
    env = {**os.environ, "FEDGAP_NO_DOWNLOAD": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "fedgap", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


# Small but real: MNIST, 100 clients, few sampled per round, evaluation only at the end.
FAST = ["data.num_clients=100", "server.clients_per_round=3", "eval.every=1000"]


def idx_bytes(array) -> bytes:
    """An IDX file's bytes for a uint8 array (the format of the MNIST files)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype("uint8").tobytes()


@pytest.fixture(scope="session")
def tiny_idx(tmp_path_factory):
    """The first 300 training and 200 test images of the shipped MNIST as an IDX set, for fast exact runs
    (``data.name=idx data.root=<this>``)."""
    import gzip

    import numpy as np

    from fedgap.data.datasets import FILES

    root = tmp_path_factory.mktemp("tiny_idx")
    for key, stem in FILES.items():
        raw = gzip.decompress((REPO / "data" / "mnist" / f"{stem}.gz").read_bytes())
        ndim = raw[3]
        shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
        arr = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)
        (root / stem).write_bytes(idx_bytes(arr[: 300 if key.startswith("train") else 200]))
    return str(root)


def tiny_args(root):
    """A real but tiny federated setting on the tiny IDX set (10 clients, 3 per round, 2 rounds)."""
    return ["data.name=idx", f"data.root={root}", "data.num_clients=10", "server.clients_per_round=3",
            "data.min_samples=5", "server.rounds=2", "eval.every=1"]


@pytest.fixture(scope="session")
def doctored(tiny_idx, tmp_path_factory):
    """One quick doctor run on the tiny set through the real CLI: (out folder, CompletedProcess)."""
    out = tmp_path_factory.mktemp("doctor") / "d"
    done = subprocess.run([sys.executable, "-m", "fedgap", "doctor", *tiny_args(tiny_idx), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done
