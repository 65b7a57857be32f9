"""Data sets held in memory as tensors: MNIST (shipped, verified) and any set in the same four-file IDX layout.

The training and test images are loaded once, scaled to [0, 1], standardized with the training set's mean and
standard deviation and kept as one float32 tensor of shape (N, 1, H, W); every later step indexes into it.
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
    train_x: torch.Tensor  # float32 (N, 1, H, W), standardized
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: float
    std: float

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
def load_dataset(name: str = "mnist", root: str | None = None) -> Dataset:
    """Load a data set once per process (cached): ``mnist`` (verified) or ``idx`` (any IDX set in root)."""
    if name == "mnist":
        base = Path(root) if root else default_mnist_root()
        arrays = {k: _load_file(base, stem, verify=True, download=True) for k, stem in FILES.items()}
    elif name == "idx":
        if not root:
            raise DataError("data.root: required when data.name=idx")
        base = Path(root)
        if not base.is_dir():
            raise DataError(f"data.root '{base}': not a folder")
        arrays = {k: _load_file(base, stem, verify=False, download=False) for k, stem in FILES.items()}
    else:
        raise DataError(f"data.name: must be one of 'mnist', 'idx', got {name!r}")
    return _to_dataset(name, base, arrays)


def _to_dataset(name: str, base: Path, arrays: dict[str, np.ndarray]) -> Dataset:
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"data set '{base}': {split} images {images.shape} and labels {labels.shape} do not match "
                f"(expected N x H x W images and N labels)"
            )
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataError(f"data set '{base}': train and test images differ in size")
    if arrays["train_images"].dtype != np.uint8 or arrays["test_images"].dtype != np.uint8:
        raise DataError(f"data set '{base}': images must be unsigned bytes (IDX type 0x08)")
    train_u8 = arrays["train_images"]
    # Mean and std from the 256-bin histogram: exact, and much faster than reductions over 47M floats.
    hist = torch.bincount(torch.from_numpy(train_u8).view(-1), minlength=256).double().numpy()
    levels = np.arange(256) / 255.0
    mean = float((hist * levels).sum() / hist.sum())
    std = float(np.sqrt((hist * (levels - mean) ** 2).sum() / (hist.sum() - 1)))
    train = torch.from_numpy(train_u8).float().div_(255.0).sub_(mean).div_(std).unsqueeze(1)
    test = torch.from_numpy(arrays["test_images"]).float().div_(255.0).sub_(mean).div_(std).unsqueeze(1)
    train_y = torch.from_numpy(arrays["train_labels"].astype(np.int64))
    test_y = torch.from_numpy(arrays["test_labels"].astype(np.int64))
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    return Dataset(name, train, train_y, test, test_y, num_classes, mean, std)
