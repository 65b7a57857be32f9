"""Client optimizers and objective corrections over stacked per-client tensors ([K, *shape]).

Each step updates the active prefix [:A] of every stacked tensor in place; clients past their last step sit
behind the prefix and do not move (parameters, optimizer state, control-variate sums). All active clients of a
cohort take their n-th step together, so a step count is one Python number for all of them.

The formulas are torch.optim's, op for op as its single-tensor code has them (``local_update``'s foreach
implementation runs the same element-wise operations, so the two agree to float rounding):

- SGD: g <- g + wd * p; buf <- g at the first step, else momentum * buf + g; p <- p - lr * buf (or g
  without momentum).
- Adam: g <- g + wd * p; m <- lerp(m, g, 1 - b1); v <- b2 * v + (1 - b2) g^2;
  p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
- AdamW: as Adam without the coupled term, after p <- p * (1 - lr * wd) (decoupled decay).

The client objective (loss and gradient corrections) is not here: the vectorized engine runs the objects of
``fedgap.fl.objectives`` over the stacked tensors, the same code as ``local_update``.
"""

from __future__ import annotations

import torch

Stacked = dict[str, torch.Tensor]


class CohortOptimizer:
    def __init__(self, params: Stacked, name: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if name not in ("sgd", "adam", "adamw"):
            raise ValueError(f"client.optimizer: unknown optimizer {name!r}")
        self.params, self.name, self.lr, self.momentum, self.wd = params, name, lr, momentum, weight_decay
        self.betas, self.eps = betas, eps
        self.state: dict[str, list[torch.Tensor]] = {}
        self.steps = 0

    @torch.no_grad()
    def step(self, grads: Stacked, active: int) -> None:
        self.steps += 1
        for name, g in grads.items():
            p = self.params[name][:active]
            if self.name == "sgd":
                self._sgd(name, p, g, active)
            else:
                self._adam(name, p, g, active)

    def _sgd(self, name: str, p: torch.Tensor, g: torch.Tensor, active: int) -> None:
        if self.wd != 0:
            g = g.add(p, alpha=self.wd)
        if self.momentum != 0:
            if name not in self.state:  # first step: the buffer is the gradient (every client steps at once)
                self.state[name] = [g.detach().clone()]
            else:
                buf = self.state[name][0][:active]
                buf.mul_(self.momentum).add_(g)
                g = buf
        p.add_(g, alpha=-self.lr)

    def _adam(self, name: str, p: torch.Tensor, g: torch.Tensor, active: int) -> None:
        if name not in self.state:
            self.state[name] = [torch.zeros_like(g), torch.zeros_like(g)]
        exp_avg, exp_avg_sq = (s[:active] for s in self.state[name])
        beta1, beta2 = self.betas
        if self.wd != 0:
            if self.name == "adamw":
                p.mul_(1 - self.lr * self.wd)
            else:
                g = g.add(p, alpha=self.wd)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = float(self.steps)
        step_size = self.lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)
