"""Keras 3 on PyTorch, imported lazily: nothing here imports Keras unless a Keras model is in use.

- ``use_torch_backend()`` runs before fedgap imports the user's model code (which may ``import keras`` at its
  top): it sets ``KERAS_BACKEND=torch`` (inherited by worker processes and Ray actors), so Keras layers are
  ``torch.nn.Module``s and their variables ``torch.nn.Parameter``s. Keras imported earlier in the process
  with another backend cannot be switched: ``keras_module()`` then raises one line.
- ``keras_build_scope(seed)``: Keras names layers from a process-wide counter ("conv2d", "conv2d_1", ...) and
  draws the seeds of unseeded initializers from Python's ``random``. fedgap builds the same model in several
  processes and several times per process (the run, its evaluation model, every worker), and its state keys
  come from those names; inside the scope the counter starts afresh and ``random`` is seeded, so every build
  of a config gives the same names and the same initial weights. Both are restored afterwards. Imports draw
  from ``random`` too (``rich.style`` does, and Keras imports rich), so ``build_model`` imports the user's file
  and Keras before it enters the scope: a fresh process and one that imported them long before build the same
  model.
"""

from __future__ import annotations

import collections
import os
import random
import sys
from contextlib import contextmanager

from fedgap.errors import ConfigError

BACKEND = "torch"


def use_torch_backend() -> None:
    """Make a later ``import keras`` use the torch backend (no effect once Keras is imported)."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = BACKEND


def keras_module():
    """The imported ``keras`` on the torch backend (imports it if needed)."""
    use_torch_backend()
    try:
        import keras
    except ImportError:
        raise ConfigError("model.name: a Keras model needs Keras 3: pip install 'fedgap[keras]'") from None
    backend = keras.backend.backend()
    if backend != BACKEND:
        raise ConfigError(f"model.name: Keras was imported with the {backend} backend before fedgap could set "
                          f"KERAS_BACKEND=torch; set KERAS_BACKEND=torch before importing keras")
    return keras


def is_keras_object(obj) -> bool:
    """Whether ``obj`` is a Keras object (a model or a layer), without importing Keras: none exists before
    Keras is imported."""
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(obj, (keras.Model, keras.Layer, keras.Operation))


def is_keras_model(obj) -> bool:
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(obj, keras.Model)


@contextmanager
def keras_build_scope(seed: int):
    """Fresh layer-name counters and a seeded ``random`` while a Keras model is built (restored afterwards)."""
    state = random.getstate()
    random.seed(seed)
    uids = None
    if "keras" in sys.modules:  # else no Keras object exists yet, and the counters start fresh anyway
        from keras.src.backend.common import global_state  # private: the counter has no public reset-and-restore

        uids = global_state.get_global_attribute("object_name_uids")
        global_state.set_global_attribute("object_name_uids", collections.defaultdict(int))
    try:
        yield
    finally:
        random.setstate(state)
        if "keras" in sys.modules:
            from keras.src.backend.common import global_state

            global_state.set_global_attribute("object_name_uids",
                                              uids if uids is not None else collections.defaultdict(int))
