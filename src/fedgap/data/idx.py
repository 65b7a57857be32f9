"""Reader for the IDX format of MNIST and its relatives (Fashion-MNIST, KMNIST, EMNIST).

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one big-endian
uint32 per dimension, then the data in row-major order. Files may be gzip-compressed. The reader checks that
the payload has exactly the size the header promises, so a truncated file is reported, never half-read.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

from fedgap.errors import DataError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_bytes(path: Path) -> bytes:
    """The decompressed bytes of ``path`` (.gz or raw)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file '{path}': not found") from None
    except OSError as exc:
        raise DataError(f"data file '{path}': cannot be read ({exc.strerror})") from None
    if path.suffix == ".gz":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            raise DataError(f"data file '{path}': truncated or corrupted gzip stream") from None
    return raw


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into an array; raise DataError naming ``name`` when the bytes are not valid IDX."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataError(f"data file '{name}': not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"data file '{name}': truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[data[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(f"data file '{name}': {state} ({len(data)} bytes, header implies {expected})")
    # A writable copy: torch warns on (and must not write through) read-only numpy buffers.
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).copy()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
