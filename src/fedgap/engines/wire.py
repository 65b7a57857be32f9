"""What crosses a process boundary per round, and how: pickle with every CPU tensor sent as a numpy array.

Plain pickling of a torch tensor goes through torch.save (a zip archive per tensor, tens of microseconds
each), and torch.multiprocessing's reductions move every tensor into a fresh shared-memory file (a file and a
file descriptor per tensor, slow for the ~30 small tensors of a model state and leaky when a worker dies).
A model state is small (53 KB for mobilenet-like), so copying its bytes through the pipe is the cheapest and
simplest path; numpy arrays pickle as raw bytes. The round trip is exact (same dtype, shape and bits).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import torch

_NUMPY_DTYPES = {torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                 torch.uint8, torch.bool}


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.dtype in _NUMPY_DTYPES \
                and type(obj) is torch.Tensor:
            return _tensor, (obj.detach().contiguous().numpy(),)
        return NotImplemented


def dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def loads(payload: bytes) -> Any:
    return pickle.loads(payload)
