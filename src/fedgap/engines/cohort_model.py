"""One network's forward pass for a cohort of A clients at once, each with its own parameters and buffers.

The model is traced once (``torch.fx``) and its graph is run with batched versions of its layers, over
per-client parameters stacked along a leading client dimension ([A, *shape]):

- image tensors are laid out with the clients folded into the channels, [B, A*C, H, W] (client a owns channels
  a*C .. a*C+C-1), kept channels-last when ``engine.channels_last`` is on;
- ``Conv2d`` becomes one grouped convolution with groups = A x groups (a depthwise conv: groups = A x C), the
  stacked weights reshaped to [A*O, C/g, kh, kw]: each output channel still sees only its client's input;
- ``BatchNorm2d`` normalizes each of the A*C channels by its own batch statistics over (B, H, W): exactly the
  per-client statistics. When every client has B real rows it is torch's own batch_norm (same kernel as the
  sequential engine, running statistics updated in place in the stacked buffers); when some client's batch is
  short (the last batch of an epoch), the padded rows are masked out of the mean, the biased variance used for
  normalizing and the unbiased variance of the running-statistics update (momentum as in torch:
  r <- (1 - m) r + m s);
- ``GroupNorm`` (group, layer and instance norm) is per sample: A x groups groups over the A*C channels;
- after ``flatten`` vectors are laid out [A, B, F] and ``Linear`` is one batched matmul (``baddbmm``);
- ``Dropout`` multiplies by noise drawn for each client from that client's own generator, with the shape of that
  client's real batch, as ``F.dropout`` draws it on CPU (``bernoulli_(1 - p)`` then ``div_(1 - p)``): the
  sequential engine's masks, bit for bit.

Per-sample layers (ReLU, ReLU6, pooling) run unchanged. Padded rows are zero images: they stay finite through
every layer and are excluded from the loss, so they contribute nothing to any gradient or statistic.

Why not ``vmap(grad(functional_call(...)))``: it lowers to the same grouped convolutions, but measured on this
CPU it was 2-2.5x slower than this hand-batched graph (docs/engines.md), and torch's batch_norm cannot mask rows.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fedgap.engines.masked_norm import masked_batch_norm
from fedgap.errors import ConfigError
from fedgap.models.keras_adapter import KerasModel

# Per-sample modules that run unchanged on the [B, A*C, H, W] layout.
PER_SAMPLE = (nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity)


@dataclass
class StepRows:
    """What the forward pass needs to know about this step's rows."""

    active: int  # A: clients in this step
    rows: int  # B: rows per client, padded
    counts: list[int]  # real rows of each active client
    mask: torch.Tensor | None  # [B, A] 1.0 for real rows; None when every client has B real rows
    dropout_gens: list[torch.Generator] | None = None  # each active client's dropout generator


class CohortModel:
    def __init__(self, model: nn.Module, channels_last: bool = True):
        self.channels_last = channels_last
        if isinstance(model, KerasModel):
            raise ConfigError("engine.name: vectorized cannot batch a Keras model (torch.fx cannot trace Keras "
                              "layers); use engine.name=sequential, parallel or ray")
        try:
            self.graph = fx.symbolic_trace(model)
        except Exception as exc:
            reason = " ".join(str(exc).split())[:160]
            raise ConfigError(f"engine.name: vectorized cannot trace the model with torch.fx ({type(exc).__name__}: "
                              f"{reason}); use engine.name=sequential") from None
        self.modules = dict(self.graph.named_modules())
        self.param_names = [k for k, _ in model.named_parameters()]
        self.buffer_names = [k for k, v in model.named_buffers() if v.is_floating_point()]
        self.state_names = [k for k, v in model.state_dict().items() if v.is_floating_point()]
        for node in self.graph.graph.nodes:
            _check_supported(node, self.modules)

    def forward(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, step: StepRows) -> torch.Tensor:
        """Logits [A, B, classes] for images ``x`` in the cohort layout [B, A*C, H, W]. ``tensors`` maps every
        parameter and floating buffer name to its stacked [A, ...] tensor; BatchNorm running statistics are
        updated in place."""
        env: dict[str, torch.Tensor] = {}
        for node in self.graph.graph.nodes:
            args = [env[a.name] if isinstance(a, fx.Node) else a for a in node.args]
            if node.op == "placeholder":
                out = x
            elif node.op == "output":
                return env[node.args[0].name]
            elif node.op == "call_module":
                out = self._module(node.target, self.modules[node.target], args[0], tensors, step)
            elif node.op == "call_method":  # flatten(1), the only method (checked at init)
                out = to_vectors(self._grad_layout(args[0]), step.active)
            else:  # operator.add: residual connection, same layout on both sides
                out = args[0] + args[1]
            env[node.name] = out
        raise AssertionError("graph without output")

    def _module(self, name: str, m: nn.Module, h: torch.Tensor, t: dict[str, torch.Tensor],
                step: StepRows) -> torch.Tensor:
        a = step.active
        if isinstance(m, nn.Conv2d):
            w = t[f"{name}.weight"]
            w = w.reshape(-1, *w.shape[2:])
            if self.channels_last:
                # oneDNN runs channels-last if the input or the weight has channels-last strides. A weight with
                # one input channel or a 1x1 kernel is contiguous in both layouts (``contiguous`` would keep its
                # NCHW strides), and so is a one-channel input: clone forces the strides, as ``module.to`` does.
                w = w.clone(memory_format=torch.channels_last)
            b = t.get(f"{name}.bias")
            return F.conv2d(h, w, None if b is None else b.reshape(-1), m.stride, m.padding, m.dilation, m.groups * a)
        if isinstance(m, nn.BatchNorm2d):
            args = (t[f"{name}.weight"], t[f"{name}.bias"], t[f"{name}.running_mean"], t[f"{name}.running_var"])
            if step.mask is None:
                w, b, rm, rv = (v.reshape(-1) for v in args)
                return F.batch_norm(h, rm, rv, w, b, True, m.momentum, m.eps)
            return masked_batch_norm(h, *args, step.mask, step.counts, m.momentum, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(h, m.num_groups * a, t[f"{name}.weight"].reshape(-1),
                                t[f"{name}.bias"].reshape(-1), m.eps)
        if isinstance(m, nn.Linear):
            return _BatchedLinear.apply(h, t[f"{name}.weight"], t[f"{name}.bias"])
        if isinstance(m, nn.Flatten):
            return to_vectors(self._grad_layout(h), a)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return m(self._grad_layout(h))
        if isinstance(m, nn.Dropout):
            return dropout(h, m.p, step) if m.p > 0 else h
        return m(h)  # PER_SAMPLE


    def _grad_layout(self, h: torch.Tensor) -> torch.Tensor:
        """The gradient that pooling or flatten sends back is dense NCHW; the ReLU and BatchNorm backward
        before it would mix layouts and take torch's slow strided path (measured: 3.3 ms per call against
        0.6 ms): hand it back channels-last. A layout copy moves values without arithmetic."""
        if self.channels_last and h.requires_grad and h.dim() == 4:
            h.register_hook(_to_channels_last)
        return h


class _BatchedLinear(torch.autograd.Function):
    """y[a] = x[a] W[a]^T + b[a] for x [A, B, F], W [A, O, F]. Autograd's own backward of the batched matmul
    returns dW as a transposed view; the optimizer's element-wise updates over a transposed [A, O, F] tensor then
    walk memory with stride O (measured: the FedAvg CNN's 16 MB-per-client layer ran 1.5x slower per step).
    Here dW = g^T x comes out contiguous."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dx = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        return dx, torch.bmm(grad.transpose(1, 2), x), grad.sum(1)


def _to_channels_last(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous(memory_format=torch.channels_last)


def to_vectors(h: torch.Tensor, a: int) -> torch.Tensor:
    """[B, A*C, H, W] -> [A, B, C*H*W], each client's features in (C, H, W) order as ``flatten(1)`` has them."""
    n = h.shape[0]
    return h.reshape(n, a, -1).transpose(0, 1).reshape(a, n, -1) if h.dim() > 2 else h


def dropout(h: torch.Tensor, p: float, step: StepRows) -> torch.Tensor:
    """h: [A, B, F]. Client a's mask has the shape of its real rows [counts[a], F] and comes from its generator,
    drawn as F.dropout draws on CPU; padded rows get 0."""
    a, n_rows, feat = h.shape
    noise = torch.zeros(a, n_rows, feat, dtype=h.dtype)
    for i, (count, gen) in enumerate(zip(step.counts, step.dropout_gens, strict=True)):
        noise[i, :count] = torch.empty(count, feat, dtype=h.dtype).bernoulli_(1 - p, generator=gen).div_(1 - p)
    return h * noise.to(h.device)


def _check_supported(node: fx.Node, modules: dict[str, nn.Module]) -> None:
    ok = node.op in ("placeholder", "output")
    if node.op == "call_module":
        m = modules[node.target]
        ok = isinstance(m, (nn.Conv2d, nn.GroupNorm, nn.Linear, nn.Flatten, nn.Dropout, *PER_SAMPLE))
        if isinstance(m, nn.Conv2d):
            ok = m.padding_mode == "zeros" and isinstance(m.padding, tuple)
        elif isinstance(m, nn.BatchNorm2d):
            ok = m.affine and m.track_running_stats and m.momentum is not None
        elif isinstance(m, nn.Flatten):
            ok = m.start_dim == 1 and m.end_dim == -1
        elif isinstance(m, nn.GroupNorm):
            ok = m.affine
        elif isinstance(m, nn.Linear):
            ok = m.bias is not None
    elif node.op == "call_method":
        ok = node.target == "flatten" and tuple(node.args[1:]) == (1,) and not node.kwargs
    elif node.op == "call_function":
        ok = node.target in (operator.add, torch.add) and not node.kwargs
    if not ok:
        if node.op == "call_module":
            what = f"layer '{node.target}' ({type(modules[node.target]).__name__})"
        else:
            what = f"operation {getattr(node.target, '__name__', node.target)!s} (at graph node '{node.name}')"
        raise ConfigError(f"engine.name: vectorized cannot batch the model's {what}; use engine.name=sequential")
