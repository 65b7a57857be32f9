"""Data sets held in memory as tensors: MNIST (shipped, verified), any set in the same four-file IDX layout,
a .npz file of arrays (``fedgap.data.npz``) and a folder of images (``fedgap.data.folder``).

The training and test images are loaded once, scaled to [0, 1] (uint8) and standardized per channel with the
training set's mean and standard deviation (``fedgap.data.arrays``), and kept as one float32 tensor of shape
(N, C, H, W); every later step indexes into it.
"""

from __future__ import annotations

import gzip
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedgap.data.arrays import channel_moments, check_arrays, standardized
from fedgap.data.idx import parse_idx, read_bytes, sha256
from fedgap.errors import DataError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# SHA-256 of the *decompressed* MNIST files: gz bytes differ between mirrors, the payload does not.
MNIST_SHA256 = {
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
}

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor  # float32 (N, C, H, W), standardized per channel
    train_y: torch.Tensor  # int64 (N,), labels 0..num_classes-1
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]  # per channel, of the training images on the [0, 1] scale (uint8) or as given
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]


def default_mnist_root() -> Path:
    """Where the shipped MNIST files are: $FEDGAP_DATA/mnist, the repository's data/mnist, ./data/mnist,
    or (for a download) ~/.cache/fedgap/mnist."""
    candidates = []
    if os.environ.get("FEDGAP_DATA"):
        candidates.append(Path(os.environ["FEDGAP_DATA"]) / "mnist")
    candidates.append(Path(__file__).resolve().parents[3] / "data" / "mnist")
    candidates.append(Path.cwd() / "data" / "mnist")
    for path in candidates:
        if all(_find(path, f) for f in FILES.values()):
            return path
    return Path.home() / ".cache" / "fedgap" / "mnist"


def _find(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _download(root: Path, stem: str) -> Path:
    """Fetch ``stem``.gz from the MNIST mirrors into root, verified; one-line DataError when offline."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{stem}.gz"
    reasons = []
    for mirror in MNIST_MIRRORS:
        try:
            with urllib.request.urlopen(mirror + f"{stem}.gz", timeout=20) as response:
                payload = response.read()
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reasons.append(str(getattr(exc, "reason", exc)))
            continue
        try:
            ok = sha256(gzip.decompress(payload)) == MNIST_SHA256[stem]
        except OSError:
            ok = False
        if ok:
            tmp = target.with_suffix(".gz.part")
            tmp.write_bytes(payload)
            tmp.replace(target)
            return target
        reasons.append(f"{mirror}: checksum mismatch")
    raise DataError(
        f"data file '{root / stem}[.gz]': missing, and the download failed ({reasons[-1] if reasons else 'offline'}); "
        f"copy the four MNIST files into {root}"
    )


def _load_file(root: Path, stem: str, verify: bool, download: bool) -> np.ndarray:
    path = _find(root, stem)
    if path is None:
        if not download or os.environ.get("FEDGAP_NO_DOWNLOAD"):
            raise DataError(f"data file '{root / stem}[.gz]': not found")
        path = _download(root, stem)
    payload = read_bytes(path)
    if verify and sha256(payload) != MNIST_SHA256[stem]:
        raise DataError(
            f"data file '{path}': SHA-256 of its contents does not match MNIST's (corrupted or a different "
            f"data set; use data.name=idx for other IDX sets)"
        )
    return parse_idx(payload, str(path))


@lru_cache(maxsize=4)
def load_dataset(name: str = "mnist", root: str | None = None, path: str | None = None) -> Dataset:
    """Load a data set once per process (cached): ``mnist`` (verified), ``idx`` (any IDX set in root), ``npz``
    (the file ``path``) or ``folder`` (an image folder ``root``)."""
    if name == "mnist":
        base = Path(root) if root else default_mnist_root()
        arrays = {k: _load_file(base, stem, verify=True, download=True) for k, stem in FILES.items()}
        return to_dataset(name, str(base), arrays, idx=True)
    if name == "idx":
        if not root:
            raise DataError("data.root: required when data.name=idx")
        base = Path(root)
        if not base.is_dir():
            raise DataError(f"data.root '{base}': not a folder")
        arrays = {k: _load_file(base, stem, verify=False, download=False) for k, stem in FILES.items()}
        return to_dataset(name, str(base), arrays, idx=True)
    if name == "npz":
        from fedgap.data.npz import read_npz

        if not path:
            raise DataError("data.path: required when data.name=npz")
        return to_dataset(name, path, read_npz(Path(path)))
    if name == "folder":
        from fedgap.data.folder import read_folder

        if not root:
            raise DataError("data.root: required when data.name=folder")
        return to_dataset(name, root, read_folder(Path(root)))
    raise DataError(f"data.name: must be one of 'mnist', 'idx', 'npz', 'folder', got {name!r}")


def load_dataset_for(data_cfg) -> Dataset:
    """The data set a config's ``data`` section names."""
    return load_dataset(data_cfg.name, data_cfg.root, data_cfg.path)


def to_dataset(name: str, source: str, arrays: dict[str, np.ndarray], *, idx: bool = False) -> Dataset:
    """Checked, standardized tensors from the four arrays ``train_images``, ``train_labels``, ``test_images``,
    ``test_labels``; ``idx``: the IDX layout (N x H x W unsigned bytes) is required."""
    if idx:
        for split in ("train", "test"):
            images = arrays[f"{split}_images"]
            if images.ndim != 3:
                raise DataError(f"data set '{source}': {split} images {images.shape} are not N x H x W")
            if images.dtype != np.uint8:
                raise DataError(f"data set '{source}': images must be unsigned bytes (IDX type 0x08)")
    arrays = check_arrays(arrays, source)
    mean, std = channel_moments(arrays["train_images"])
    train = standardized(arrays["train_images"], mean, std)
    test = standardized(arrays["test_images"], mean, std)
    train_y, test_y = torch.from_numpy(arrays["train_labels"]), torch.from_numpy(arrays["test_labels"])
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    return Dataset(name, train, train_y, test, test_y, num_classes, mean, std)
