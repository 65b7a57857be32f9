"""A data set in one .npz file: arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (what
``np.savez(path, x_train=..., ...)`` writes). Images N x H x W, N x H x W x C or N x C x H x W, uint8 or float;
labels integers 0..K-1. The checks shared with every source are in ``fedgap.data.arrays``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fedgap.errors import DataError

KEYS = {"train_images": "x_train", "train_labels": "y_train", "test_images": "x_test", "test_labels": "y_test"}


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The four arrays of ``path`` under the names ``to_dataset`` takes; one-line DataError on any problem."""
    if not path.is_file():
        raise DataError(f"data file '{path}': not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in KEYS.values() if k not in npz.files]
            if missing:
                raise DataError(f"data file '{path}': missing array(s) {', '.join(missing)} (has: "
                                f"{', '.join(npz.files) or 'none'}; expected x_train, y_train, x_test, y_test)")
            return {ours: npz[theirs] for ours, theirs in KEYS.items()}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"data file '{path}': not a readable .npz file ({type(exc).__name__}: {reason})") from None
