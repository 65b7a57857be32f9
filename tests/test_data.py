import gzip
import shutil

import numpy as np
import pytest
import torch

from fedgap.data.datasets import FILES, load_dataset
from fedgap.data.idx import parse_idx
from fedgap.errors import DataError

MNIST_DIR = __import__("conftest").REPO / "data" / "mnist"


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(root, n_train=50, n_test=20, size=12, classes=3, gz=False):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, size, size)),
        "train_labels": rng.integers(0, classes, n_train),
        "test_images": rng.integers(0, 256, (n_test, size, size)),
        "test_labels": rng.integers(0, classes, n_test),
    }
    for key, stem in FILES.items():
        payload = idx_bytes(arrays[key])
        if gz:
            (root / f"{stem}.gz").write_bytes(gzip.compress(payload))
        else:
            (root / stem).write_bytes(payload)
    return arrays


def test_shipped_mnist_loads_verified(mnist):
    assert mnist.train_x.shape == (60000, 1, 28, 28) and mnist.test_x.shape == (10000, 1, 28, 28)
    assert mnist.train_x.dtype == torch.float32
    counts = torch.bincount(mnist.train_y).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(mnist.test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(float(mnist.train_x.mean())) < 1e-3 and abs(float(mnist.train_x.std()) - 1) < 1e-3


def test_idx_roundtrip_and_errors():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert (parse_idx(idx_bytes(a)) == a).all()
    with pytest.raises(DataError, match="truncated"):
        parse_idx(idx_bytes(a)[:-1], "f")
    with pytest.raises(DataError, match="bad magic"):
        parse_idx(b"\x01\x02\x03\x04", "f")


@pytest.mark.parametrize("gz", [False, True])
def test_generic_idx_set(tmp_path, gz):
    arrays = write_idx_set(tmp_path, gz=gz)
    ds = load_dataset("idx", str(tmp_path))
    assert ds.train_x.shape == (50, 1, 12, 12) and ds.num_classes == 3
    assert (ds.train_y.numpy() == arrays["train_labels"]).all()


def test_missing_truncated_corrupted_mnist(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    with pytest.raises(DataError, match="train-images-idx3-ubyte\\[.gz\\]': not found"):
        load_dataset("mnist", str(root))
    for f in MNIST_DIR.glob("*.gz"):
        shutil.copy(f, root / f.name)
    # truncated gzip stream
    path = root / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="truncated or corrupted gzip"):
        load_dataset("mnist", str(root))
    # valid gzip, wrong content: one label changed
    raw = bytearray(gzip.decompress((MNIST_DIR / "train-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="SHA-256 of its contents does not match"):
        load_dataset("mnist", str(root))
