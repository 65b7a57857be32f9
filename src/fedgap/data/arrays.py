"""From four numpy arrays (train/test images and labels) to a ``Dataset``: checks, channel layout, per-channel
standardization. Every source (IDX, npz, image folder) ends here, so they share one set of checks and one
normalization.

Images may be N x H x W (one channel), N x H x W x C or N x C x H x W: a last axis of 1, 3 or 4 is read as the
channels (NHWC, as numpy and Pillow produce them), otherwise axis 1 is. They are uint8 (scaled to [0, 1]) or
float (taken as they are). Labels are integers 0..K-1 and every class has training samples. Each problem is a
one-line ``DataError`` naming ``source`` (the file or folder) and what is wrong.
"""

from __future__ import annotations

import numpy as np
import torch

from fedgap.errors import DataError

CHANNELS_LAST = (1, 3, 4)


def to_nchw(images: np.ndarray, source: str, split: str) -> np.ndarray:
    """The images as N x C x H x W (a view where possible)."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        return images.transpose(0, 3, 1, 2) if images.shape[3] in CHANNELS_LAST else images
    raise DataError(f"data set '{source}': {split} images have shape {images.shape}; expected N x H x W, "
                    f"N x H x W x C or N x C x H x W")


def check_arrays(arrays: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Checked arrays: images N x C x H x W (uint8 or float32), labels int64; raises DataError otherwise."""
    out = {}
    for split in ("train", "test"):
        images, labels = np.asarray(arrays[f"{split}_images"]), np.asarray(arrays[f"{split}_labels"])
        if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
            raise DataError(f"data set '{source}': {split} images are {images.dtype}; expected uint8 or float")
        images = to_nchw(images, source, split)
        if labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"data set '{source}': {split} images {images.shape} and labels {labels.shape} do not "
                            f"match (expected N images and N labels)")
        if len(labels) == 0:
            raise DataError(f"data set '{source}': no {split} samples")
        if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
            raise DataError(f"data set '{source}': {split} labels are {labels.dtype}; expected integers 0..K-1")
        if labels.min() < 0:
            raise DataError(f"data set '{source}': {split} label {int(labels.min())} is negative; expected 0..K-1")
        if images.dtype != np.uint8:
            images = images.astype(np.float32, copy=False)
            bad = ~np.isfinite(images)
            if bad.any():
                raise DataError(f"data set '{source}': {split} image {int(np.argwhere(bad)[0][0])} holds "
                                f"NaN or inf values")
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels.astype(np.int64)
    if (out["train_images"].dtype == np.uint8) != (out["test_images"].dtype == np.uint8):
        raise DataError(f"data set '{source}': train images are {out['train_images'].dtype}, test images "
                        f"{out['test_images'].dtype}; give both the same type (uint8 is scaled by 1/255)")
    if out["train_images"].shape[1:] != out["test_images"].shape[1:]:
        raise DataError(f"data set '{source}': train images are C x H x W = {out['train_images'].shape[1:]}, "
                        f"test images {out['test_images'].shape[1:]}")
    num_classes = int(max(out["train_labels"].max(), out["test_labels"].max())) + 1
    counts = np.bincount(out["train_labels"], minlength=num_classes)
    if (counts == 0).any():
        empty = np.flatnonzero(counts == 0)
        raise DataError(f"data set '{source}': class {int(empty[0])} has no training samples (labels must be "
                        f"0..K-1 = 0..{num_classes - 1} and every class must occur in training)")
    return out


def channel_moments(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of N x C x H x W images, on the [0, 1] scale for uint8.
    uint8 channels go through a 256-bin histogram: exact, and much faster than float reductions over tens of
    millions of values; float channels are reduced one channel at a time in float64."""
    means, stds = [], []
    for c in range(images.shape[1]):
        channel = images[:, c]
        if images.dtype == np.uint8:
            hist = np.bincount(np.ascontiguousarray(channel).reshape(-1), minlength=256).astype(np.float64)
            levels = np.arange(256) / 255.0
            mean = float((hist * levels).sum() / hist.sum())
            var = float((hist * (levels - mean) ** 2).sum() / max(hist.sum() - 1, 1))
        else:
            values = channel.astype(np.float64).reshape(-1)
            mean, var = float(values.mean()), float(values.var(ddof=1)) if values.size > 1 else 0.0
        means.append(mean)
        stds.append(float(np.sqrt(var)) if var > 0 else 1.0)  # a constant channel stays constant (zero)
    return tuple(means), tuple(stds)


def standardized(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """float32 N x C x H x W tensor, (x - mean) / std per channel (uint8 first scaled to [0, 1])."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.float().div_(255.0) if images.dtype == np.uint8 else x.to(torch.float32, copy=True)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)
