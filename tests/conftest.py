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
