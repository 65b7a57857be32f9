"""A data set as a folder of images (the ImageFolder layout): ``ROOT/train/CLASS/*.png|jpg`` and
``ROOT/test/CLASS/*``. Classes are numbered in the sorted order of the training folder names; a test folder
must name a training class. All images must have one size. If every image is greyscale the set has one channel
(Pillow mode L), otherwise every image is converted to RGB.

Decoding thousands of small images is slow (about as slow as a few training rounds), so the decoded arrays are
cached in ``ROOT/.fedgap-cache-<key>.npz``, where the key hashes every image's path, size and modification time:
adding, removing or editing an image makes a new cache (older caches are removed). A folder that cannot be
written is read every time.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedgap.errors import DataError

SUFFIXES = {".png", ".jpg", ".jpeg"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
CACHE_PREFIX = ".fedgap-cache-"
CACHE_FORMAT = "1"


def read_folder(root: Path) -> dict[str, np.ndarray]:
    """train/test images (N x H x W or N x H x W x 3, uint8) and labels of the folder ``root``, from the cache
    when the folder has not changed since it was written."""
    if not root.is_dir():
        raise DataError(f"data.root '{root}': not a folder")
    train = _list_split(root, "train")
    classes = sorted(train)
    test = _list_split(root, "test")
    unknown = sorted(set(test) - set(classes))
    if unknown:
        raise DataError(f"data set '{root}': test class folder '{unknown[0]}' has no folder in train/")
    files = [(split, label, path) for split, listing in (("train", train), ("test", test))
             for label, name in enumerate(classes) for path in listing.get(name, [])]
    cache = root / f"{CACHE_PREFIX}{_key(root, files)}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError):
            pass  # unreadable cache: decode again and rewrite it
    arrays = _decode(root, files)
    _write_cache(root, cache, arrays)
    return arrays


def _list_split(root: Path, split: str) -> dict[str, list[Path]]:
    """class folder name -> its image files, sorted."""
    base = root / split
    if not base.is_dir():
        raise DataError(f"data set '{root}': no folder '{split}/' (expected {split}/CLASS/*.png or *.jpg)")
    out = {}
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
        if not images and split == "train":
            raise DataError(f"data set '{root}': class folder '{split}/{folder.name}' holds no .png or .jpg image "
                            f"(every class needs training samples)")
        out[folder.name] = images
    if not out:
        raise DataError(f"data set '{root}': '{split}/' holds no class folders (expected {split}/CLASS/*.png)")
    return out


def _key(root: Path, files: list[tuple[str, int, Path]]) -> str:
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    for split, label, path in files:
        st = path.stat()
        digest.update(f"{split}\0{label}\0{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _decode(root: Path, files: list[tuple[str, int, Path]]) -> dict[str, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    pixels: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    size, colour = None, False
    console = Console(stderr=True)
    columns = (TextColumn("reading images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("read", total=len(files))
        for split, label, path in files:
            try:
                with Image.open(path) as im:
                    if size is None:
                        size = im.size
                    elif im.size != size:
                        raise DataError(f"data file '{path}': {im.size[0]} x {im.size[1]} pixels, other images "
                                        f"are {size[0]} x {size[1]} (all images must share one size)")
                    grey = im.mode in GREY_MODES
                    colour |= not grey
                    pixels[split].append(np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8))
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise DataError(f"data file '{path}': not a readable image ({type(exc).__name__})") from None
            labels[split].append(label)
            bar.advance(task)
    out = {}
    for split in ("train", "test"):
        images = [_rgb(a) if colour else a for a in pixels[split]]
        out[f"{split}_images"] = np.stack(images) if images else np.zeros((0, size[1], size[0]), np.uint8)
        out[f"{split}_labels"] = np.asarray(labels[split], dtype=np.int64)
    return out


def _rgb(a: np.ndarray) -> np.ndarray:
    """A greyscale image among colour ones, as RGB (what Pillow's convert('RGB') gives: the value repeated)."""
    return np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a


def _write_cache(root: Path, cache: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomic (a reader never sees half a cache); older caches of this folder are removed; a read-only folder
    is left alone."""
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, cache)
    except OSError:
        tmp.unlink(missing_ok=True)
        return
    for old in root.glob(f"{CACHE_PREFIX}*.npz"):
        if old != cache:
            old.unlink(missing_ok=True)
