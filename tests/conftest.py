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


# ----------------------------------------------------------------------------- your own model and data (issue 14)
OWN_MODEL = '''
"""A user's model, outside the fedgap package: RGB in, BatchNorm2d inside."""
from torch import nn


class Small(nn.Module):
    def __init__(self, num_classes, in_channels, width):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def make(num_classes, in_channels, image_size, width=8):
    return Small(num_classes, in_channels, width)
'''


def own_images(n: int, classes: int = 3, size: int = 16, seed: int = 0):
    """Learnable RGB images (NHWC uint8): class k is brighter in channel k, plus noise; labels cycle 0..k-1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    x = rng.normal(100, 30, (n, size, size, 3))
    x[np.arange(n), :, :, labels % 3] += 80
    return np.clip(x, 0, 255).astype("uint8"), labels.astype("int64")


@pytest.fixture(scope="session")
def own_model(tmp_path_factory) -> str:
    """``model.name`` of a small RGB model with BatchNorm2d in a file outside the package."""
    path = tmp_path_factory.mktemp("own_model") / "small_net.py"
    path.write_text(OWN_MODEL)
    return f"{path}:make"


@pytest.fixture(scope="session")
def own_npz(tmp_path_factory) -> str:
    """A tiny RGB npz set: 60 train / 30 test images of 16 x 16, 3 classes."""
    import numpy as np

    path = tmp_path_factory.mktemp("own_npz") / "tiny.npz"
    (x_train, y_train), (x_test, y_test) = own_images(60), own_images(30, seed=1)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


def write_image_folder(root, train: int = 60, test: int = 30, suffix: str = ".png") -> None:
    """The same kind of images as ``own_images`` as PNG files in root/train/CLASS and root/test/CLASS."""
    from PIL import Image

    for split, n, seed in (("train", train, 0), ("test", test, 1)):
        images, labels = own_images(n, seed=seed)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / ["apple", "banana", "cherry"][label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:03d}{suffix}")


@pytest.fixture(scope="session")
def own_folder(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("own_folder")
    write_image_folder(root)
    return str(root)


def own_args(data: list[str], model: str) -> list[str]:
    """A tiny federated setting on the tiny own data (6 clients, 3 per round, 2 rounds)."""
    return [*data, f"model.name={model}", "data.num_clients=6", "server.clients_per_round=3", "data.min_samples=3",
            "server.rounds=2", "eval.every=1"]
