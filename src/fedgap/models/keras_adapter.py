"""A Keras 3 model (torch backend) as a torch module that the rest of fedgap treats like any other model.

``adapt(keras_model, ...)`` checks the model, applies ``model.norm`` (``fedgap.models.keras_norm``), removes a
final softmax and wraps the result in ``KerasModel``:

- **Input**: fedgap's batches are [N, C, H, W]; the wrapper hands Keras [N, H, W, C] when
  ``keras.config.image_data_format()`` is channels_last (Keras' default), the batch unchanged otherwise.
- **Mode**: Keras ignores ``module.train()``; its layers take the mode from the call's ``training=``. The wrapper
  passes ``training=self.training``, and every BatchNormalization layer follows its own torch flag (a forward
  pre-hook sets its ``training``), which ``train()`` / ``eval()`` set with the wrapper's: so evaluation with
  batch statistics (``fedgap.fl.evaluate``: BatchNorm layers alone in train mode) works as for torch models.
- **State**: every Keras variable becomes an entry of the wrapper's ``state_dict`` under a key made from its
  path ("conv2d/kernel" -> "conv2d.kernel"; a Sequential's or nested model's own name is dropped when every
  path starts with it). Trainable variables are registered as the wrapper's parameters: the very
  ``nn.Parameter`` objects Keras computes with, so the optimizer steps what Keras uses. Non-trainable ones
  (BatchNorm's moving mean and variance) are buffers holding the same storage: the server averages them and
  never steps them, ``load_state_dict`` writes into what Keras reads, and Keras' in-place moving-average
  update (``Variable.assign`` copies into the parameter) shows in the buffer. The Keras model itself is hidden
  from the wrapper's module tree (its own ``named_parameters`` lists BatchNorm statistics as parameters).
- **Randomness**: the state of Keras' seed generators (dropout's) is not model state and is left out; in training
  each generator is reseeded before every forward pass from torch's default generator, which fedgap seeds per
  (seed, round, client), so dropout masks are reproducible and the same on every engine.
- **Softmax**: a final softmax (a ``Softmax`` layer, ``Activation('softmax')`` or a layer with
  ``activation='softmax'``) is removed, so fedgap trains and evaluates on the logits under it, as Keras does with
  the TensorFlow backend (its cross-entropy reads the logits under a softmax output); ``save_keras`` writes the
  model with it. A model that still returns probabilities is refused.

Refused with one line (``ConfigError``): several inputs or outputs, an input shape that does not match the
data, stateful layers (RNN state carried between batches), regularizers and constraints (Keras' own training
loop applies them; fedgap's does not: use ``client.weight_decay``), BatchNormalization with renorm, and
variables that are not torch tensors.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from fedgap.errors import ConfigError
from fedgap.models.convert import Replacement
from fedgap.models.info import forward_once
from fedgap.models.keras_backend import keras_module
from fedgap.models.keras_norm import KerasBatchNorm, convert_keras_norm, describe

SEED_STATE = "seed_generator_state"  # the variable name of a keras.random.SeedGenerator's state


def all_layers(model) -> list:
    """Every layer inside ``model``, nested ones included, in the order Keras tracks them."""
    return model._flatten_layers(include_self=False)


def _follow_module_mode(module, args, kwargs):
    """Forward pre-hook of a BatchNormalization layer: its torch flag decides batch or moving statistics."""
    kwargs["training"] = module.training
    return args, kwargs


class KerasModel(nn.Module):
    """A Keras model behind a torch module's interface: forward([N, C, H, W]) -> logits [N, classes]."""

    def __init__(self, keras_model, saved_model, softmax: tuple | None, notes: list[str]):
        super().__init__()
        keras = keras_module()
        # object.__setattr__: kept out of the module tree (see the module docstring)
        object.__setattr__(self, "keras_model", keras_model)
        object.__setattr__(self, "saved_model", saved_model)  # what save_keras writes: the model with its softmax
        self.softmax = softmax  # (layer, activation) swapped to linear for training, or None
        self.notes = notes
        self.channels_last = keras.config.image_data_format() == "channels_last"
        layers = all_layers(keras_model)
        self._keys: dict[int, str] = {}  # id(Keras variable) -> its state key
        self._variables: dict[str, object] = {}  # state key -> Keras variable
        self._seed_states = [v for v in keras_model.variables if v.name == SEED_STATE]
        variables = [v for v in keras_model.variables if v.name != SEED_STATE]
        prefix = _common_prefix([v.path for v in variables])
        for variable in variables:
            self._register(variable, variable.path[len(prefix):])
        bn_type = keras.layers.BatchNormalization
        self._batchnorms = {}
        self._norm_keys: set[str] = set()
        for layer in layers:
            if isinstance(layer, bn_type):
                bn = KerasBatchNorm(self._layer_name(layer), layer, self.key_of)
                self._batchnorms[bn.name] = bn
                layer.register_forward_pre_hook(_follow_module_mode, with_kwargs=True)
            if isinstance(layer, (bn_type, keras.layers.GroupNormalization, keras.layers.LayerNormalization)):
                self._norm_keys |= {self.key_of(v) for v in layer.variables if v.name != SEED_STATE}
        self.train(True)

    # ------------------------------------------------------------------------------------------------ state
    def _register(self, variable, path: str) -> None:
        value = variable.value
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"model.name: variable '{variable.path}' is a {type(value).__name__}, not a torch "
                              "tensor (fedgap runs Keras on the torch backend)")
        *parents, leaf = [part.replace(".", "_") or "_" for part in path.split("/")]
        owner: nn.Module = self
        for part in parents:
            part = _free_name(owner, part)
            if part not in owner._modules:
                owner.add_module(part, nn.Module())
            owner = owner._modules[part]
        leaf = _free_name(owner, leaf, existing_ok=False)
        if variable.trainable and isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value.detach())  # the same storage: copies either way are shared
        key = ".".join([*_path_of(self, owner), leaf])
        self._keys[id(variable)] = key
        self._variables[key] = variable

    def key_of(self, variable) -> str:
        """The state key of a Keras variable."""
        return self._keys[id(variable)]

    def _layer_name(self, layer) -> str:
        """A layer's name as its state keys show it (the key of its first variable without the variable)."""
        return self.key_of(layer.variables[0]).rpartition(".")[0] if layer.variables else layer.name

    def fedgap_batchnorm_layers(self) -> dict[str, KerasBatchNorm]:
        """The BatchNormalization layers (``fedgap.fl.batchnorm.batchnorm_layers`` asks for them)."""
        return dict(self._batchnorms)

    def fedgap_norm_state_keys(self) -> set[str]:
        """State keys of every normalization layer (batch, group, layer): what FedBN keeps per client."""
        return set(self._norm_keys)

    def _apply(self, fn, recurse=True):
        """``model.to(...)``: the converted tensors go back into the Keras variables, so both stay one."""
        super()._apply(fn, recurse)
        for prefix, module in self.named_modules():
            for name, buf in module._buffers.items():
                variable = self._variables[f"{prefix}.{name}" if prefix else name]
                if buf.data_ptr() != variable.value.data_ptr():
                    variable.value.data = buf
                    module._buffers[name] = variable.value.detach()
        return self

    # ------------------------------------------------------------------------------------------------ running
    def train(self, mode: bool = True) -> KerasModel:
        super().train(mode)
        for bn in self._batchnorms.values():
            bn.module.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        if self.training:
            for state in self._seed_states:  # dropout's generators, from fedgap's per-client torch stream
                seed = torch.randint(1, 2**31 - 1, (1,)).item()
                state.assign(torch.tensor([seed, 0], dtype=state.value.dtype))
        return self.keras_model(x, training=self.training)

    # ------------------------------------------------------------------------------------------------ info
    def norm_rows(self, replaced: list[Replacement]) -> list[Replacement]:
        """Every normalization layer: the replaced ones (was -> now), the rest kept."""
        keras = keras_module()
        kinds = (keras.layers.BatchNormalization, keras.layers.GroupNormalization, keras.layers.LayerNormalization)
        new = {r.now.rpartition(" '")[2].rstrip("'") for r in replaced}
        rows = list(replaced)
        rows += [Replacement(layer.name, describe(layer), "kept") for layer in all_layers(self.keras_model)
                 if isinstance(layer, kinds) and layer.name not in new]
        return rows

    def macs_per_image(self, image_shape: tuple[int, int, int]) -> int:
        """Multiply-accumulates of convolutions and dense layers for one image: output elements x the kernel's
        weights per output element (``fedgap.models.info``'s convention)."""
        keras = keras_module()
        total = 0

        def hook(layer, inputs, output) -> None:
            nonlocal total
            kernel = layer.kernel.shape
            per_output = torch.Size(kernel).numel() // kernel[-1]
            if isinstance(layer, keras.layers.DepthwiseConv2D):  # each output channel sees one input channel
                per_output //= kernel[-2]
            total += output.numel() * per_output

        forward_once(self, image_shape, [layer.register_forward_hook(hook) for layer in all_layers(self.keras_model)
                                         if isinstance(getattr(layer, "kernel", None), keras.Variable)])
        return total

    # ------------------------------------------------------------------------------------------------ export
    def save_keras(self, path) -> None:
        """Write the model (its current weights, its softmax back on) as a .keras file."""
        keras = keras_module()
        with self._softmax_on():
            keras.saving.save_model(self.saved_model, str(path))

    @contextlib.contextmanager
    def _softmax_on(self):
        if self.softmax is None:
            yield
            return
        layer, activation = self.softmax
        linear = layer.activation
        layer.activation = activation
        try:
            yield
        finally:
            layer.activation = linear


def _common_prefix(paths: list[str]) -> str:
    """'sequential/' when every path starts with it (a Sequential's or nested model's name), else ''."""
    heads = {p.split("/", 1)[0] for p in paths}
    if len(heads) == 1 and all("/" in p for p in paths) and all(p.count("/") >= 2 for p in paths):
        return f"{heads.pop()}/"
    return ""


def _free_name(owner: nn.Module, name: str, existing_ok: bool = True) -> str:
    """``name``, with '_' appended while it would shadow an attribute of ``owner`` (e.g. a layer named
    'training')."""
    while hasattr(owner, name) and not (existing_ok and name in owner._modules):
        name += "_"
    return name


def _path_of(root: nn.Module, module: nn.Module) -> list[str]:
    if module is root:
        return []
    name = next(n for n, m in root.named_modules() if m is module)
    return name.split(".")


# ---------------------------------------------------------------------------------------------------- adapt
def adapt(model, name: str, num_classes: int, in_channels: int, image_size: tuple[int, int], norm: str,
          groups: int) -> tuple[KerasModel, list[Replacement]]:
    """The factory's Keras model as a ``KerasModel`` with ``model.norm`` applied (call inside
    ``fedgap.models.keras_backend.keras_build_scope``)."""
    keras = keras_module()
    if not isinstance(model, keras.Model):
        raise ConfigError(f"model.name: {name} returned a Keras {type(model).__name__}, not a keras.Model "
                          "(wrap it: keras.Sequential([keras.Input(shape), layer]))")
    channels_last = keras.config.image_data_format() == "channels_last"
    shape = (*image_size, in_channels) if channels_last else (in_channels, *image_size)
    _check_input(model, name, shape, channels_last)
    _check_layers(model, name)
    model, replaced = convert_keras_norm(model, norm, groups, name)
    logits, softmax, notes = strip_softmax(model)
    wrapped = KerasModel(logits, model, softmax, notes)
    _check_logits(wrapped, name, in_channels, image_size)
    return wrapped, replaced


def _check_input(model, name: str, shape: tuple[int, ...], channels_last: bool) -> None:
    if not model.built:  # a Sequential without an Input, a subclassed model: built by a first call
        try:
            with torch.no_grad():
                model(torch.zeros(1, *shape), training=False)
        except Exception as exc:
            raise ConfigError(f"model.name: {name} cannot be built for inputs {shape}: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]}") from None
    inputs = getattr(model, "inputs", None)
    if inputs is None:  # a subclassed model: its inputs are only known by calling it (check_output does)
        return
    outputs = model.outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise ConfigError(f"model.name: {name} has {len(inputs)} input(s) and {len(outputs)} output(s); fedgap "
                          "feeds one batch of images and trains one output of logits")
    expected = tuple(inputs[0].shape[1:])
    if len(expected) != 3 or any(e is not None and e != g for e, g in zip(expected, shape, strict=False)):
        order = "height, width, channels" if channels_last else "channels, height, width"
        raise ConfigError(f"model.name: {name} expects inputs of shape {_shape_text(expected)} ({order}), the data "
                          f"set's images are {_shape_text(shape)}")


def _shape_text(shape) -> str:
    return "(" + ", ".join("any" if s is None else str(s) for s in shape) + ")"


def _check_layers(model, name: str) -> None:
    keras = keras_module()
    for layer in all_layers(model):
        what = f"model.name: {name}: layer '{layer.name}' ({type(layer).__name__})"
        if getattr(layer, "stateful", False):
            raise ConfigError(f"{what} is stateful (it carries state from batch to batch), which fedgap's clients "
                              "cannot; use stateful=False")
        if isinstance(layer, keras.layers.BatchNormalization) and layer.renorm:
            raise ConfigError(f"{what} uses renorm=True, which fedgap's BatchNorm policies do not model; use "
                              "renorm=False")
        config = _config(layer)
        for key, value in config.items():
            if value is not None and (key.endswith("_regularizer") or key.endswith("_constraint")):
                raise ConfigError(f"{what} has a {key}, which Keras' own training loop applies and fedgap's does "
                                  "not; remove it (client.weight_decay is fedgap's L2 penalty)")


def _config(layer) -> dict:
    try:
        return layer.get_config()
    except Exception:  # a custom layer without get_config: nothing to check there
        return {}


def strip_softmax(model):
    """(the model that gives the logits, (layer, softmax) swapped to linear or None, notes)."""
    keras = keras_module()
    outputs = getattr(model, "outputs", None)
    if not outputs:
        return model, None, []
    op = outputs[0]._keras_history.operation
    softmax = keras.activations.softmax
    is_softmax_op = isinstance(op, keras.layers.Softmax) or type(op).__name__ == "Softmax" or (
        isinstance(op, keras.layers.Activation) and op.activation is softmax)
    if is_softmax_op:
        logits = keras.Model(model.inputs, op.input, name=model.name)
        return logits, None, [f"the final {type(op).__name__} '{op.name}' is left out: fedgap trains and evaluates "
                              "on the logits under it; fedgap export keras writes the model with it"]
    if getattr(op, "activation", None) is softmax:
        op.activation = keras.activations.linear
        return model, (op, softmax), [f"the softmax of the final layer '{op.name}' is left out: fedgap trains and "
                                      "evaluates on the logits under it; fedgap export keras writes it back"]
    return model, None, []


def _check_logits(model: KerasModel, name: str, in_channels: int, image_size: tuple[int, int]) -> None:
    """A model that still returns probabilities (a softmax fedgap found no final layer for) is refused: the
    cross-entropy of fedgap's objectives needs logits."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x = torch.randn(2, in_channels, *image_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception:
        return  # custom.check_output reports a failing forward pass in one line
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] > 1 and bool((out >= 0).all()) and \
            torch.allclose(out.sum(1).double(), torch.ones(2, dtype=torch.float64), atol=1e-5):
        raise ConfigError(f"model.name: {name} returns probabilities (a softmax that is not the final layer); "
                          "return the logits, or end the model with Dense(..., activation='softmax') or a Softmax "
                          "layer, which fedgap removes")
