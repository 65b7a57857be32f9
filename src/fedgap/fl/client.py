"""The local update: one client's training in one round. Every engine that runs clients one at a time
(sequential, parallel, ray) calls ``local_update``; the vectorized engine reproduces exactly this math.

A client starts from the global state (under the ``local`` norm policy, with its own norm layers swapped in),
trains ``client.epochs`` passes over its data in minibatches drawn from a generator seeded by
(seed, round, client), with the loss its objective computes from the logits (the loss hook: logit adjustment,
FedLC, FedRS) and each gradient corrected as its objective says (FedProx, SCAFFOLD, FedDyn), steps its
optimizer (created fresh each round: client optimizer state is not carried across rounds), and returns its final
state. The objective runs the client as a cohort of one (tensors [1, ...]): the vectorized engine runs the same
objective code over [K, ...] (``fedgap.fl.objectives.base``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fedgap import seeding
from fedgap.fl.augment import random_affine
from fedgap.fl.device import seed_device, to_cpu, to_device
from fedgap.fl.normpolicy import norm_policy
from fedgap.fl.objectives import ClientSetup, Objective, make_objective, objective_params
from fedgap.fl.state import State


@dataclass(frozen=True)
class ClientHParams:
    """Everything a client needs to know about the experiment; small and picklable (it goes to workers)."""

    seed: int
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 32
    augment: bool = False
    augment_shift: int = 2
    augment_rotate: float = 10.0
    objective: str = "local"
    objective_params: object = None  # one Params per part of ``objective`` (a tuple); None: their defaults
    num_classes: int = 10
    norm_policy: str = "average"
    norm_keys: frozenset[str] = frozenset()
    channels_last: bool = False
    fail_clients: frozenset[int] = frozenset()
    lr_decay: float = 1.0

    def lr_scale(self, round_: int) -> float:
        """The client lr schedule (client.lr_decay): round ``round_`` (1-based) trains at lr * lr_scale."""
        return self.lr_decay ** (round_ - 1)

    @classmethod
    def from_config(cls, cfg, norm_keys=frozenset(), num_classes: int = 10) -> ClientHParams:
        c = cfg.client
        return cls(
            seed=cfg.seed, optimizer=c.optimizer, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
            epochs=c.epochs, batch_size=c.batch_size, augment=c.augment, augment_shift=c.augment_shift,
            augment_rotate=c.augment_rotate, objective=c.objective,
            objective_params=objective_params(c.objective, cfg), num_classes=num_classes,
            norm_policy=cfg.model.norm_policy, norm_keys=frozenset(norm_keys),
            channels_last=cfg.engine.channels_last, fail_clients=frozenset(cfg.engine.fail_clients),
            lr_decay=c.lr_decay,
        )


@dataclass
class RoundContext:
    """What the server sends to every client of a round (once per round, whatever the engine)."""

    round: int
    global_state: State
    payload: State = field(default_factory=dict)  # the objective's round payload (SCAFFOLD: c)
    lr_scale: float = 1.0  # this round's client lr is client.lr * lr_scale (client.lr_decay)


@dataclass
class ClientTask:
    client_id: int
    indices: np.ndarray  # rows of the training set this client holds
    own: dict[str, State] = field(default_factory=dict)  # persistent state: "objective" (c_i), "norm" (FedBN)


@dataclass
class ClientResult:
    client_id: int
    num_samples: int  # the client's data set size: its aggregation weight
    state: State  # final floating-point state (parameters and buffers)
    train_loss: float  # mean minibatch loss over the samples processed
    samples: int  # samples processed (num_samples x epochs)
    steps: int
    own: dict[str, State] = field(default_factory=dict)
    upload: State = field(default_factory=dict)
    seconds: float = 0.0


class InjectedClientFailure(RuntimeError):
    """Raised by clients listed in engine.fail_clients (fault-injection for tests)."""


def raise_if_injected(task: ClientTask, hp: ClientHParams) -> None:
    """Fault injection: a client listed in engine.fail_clients fails (every engine calls this)."""
    if task.client_id in hp.fail_clients:
        raise InjectedClientFailure(f"client {task.client_id} failed (engine.fail_clients)")


def start_state(ctx: RoundContext, task: ClientTask, hp: ClientHParams) -> State:
    """The global state, with this client's own norm layers under the ``local`` (FedBN) policy."""
    return norm_policy(hp.norm_policy).client_start(ctx.global_state, task.own)


def load_state(model: torch.nn.Module, state: State) -> None:
    """``model.load_state_dict(state)`` (strict) for the model a runner reuses for every client: the same
    in-place copies into the same tensors, without rebuilding the module walk each time (1.7 ms per client
    for mobilenet-like, measured; it matters when clients hold a handful of samples). The model's tensors are
    looked up once: a module whose buffers are replaced afterwards (``model.to(...)``) must not come here again."""
    targets = getattr(model, "_fedgap_state_targets", None)
    if targets is None:
        targets = model.state_dict(keep_vars=True)
        model._fedgap_state_targets = targets
    if state.keys() != targets.keys() or any(state[k].shape != t.shape for k, t in targets.items()):
        model.load_state_dict(state)  # raises with torch's message on missing or unexpected keys
        return
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(state[key])


def client_result(task: ClientTask, hp: ClientHParams, final: State, loss_sum: float, steps: int,
                  new_own: State, upload: State, seconds: float) -> ClientResult:
    """A client's result, whichever engine trained it: its final floating state, mean training loss, what it
    keeps for its next round (its objective's state ``new_own``, and under FedBN its norm layers) and what it
    uploads for the objective's server state."""
    own: dict[str, State] = {"objective": new_own} if new_own else {}
    own.update(norm_policy(hp.norm_policy).client_keeps(final, hp.norm_keys))
    n = len(task.indices)
    samples = n * hp.epochs
    return ClientResult(client_id=task.client_id, num_samples=n, state=final, train_loss=loss_sum / max(samples, 1),
                        samples=samples, steps=steps, own=own, upload=upload, seconds=seconds)


def client_objective(hp: ClientHParams) -> Objective:
    return make_objective(hp.objective, hp.objective_params)


def label_counts(y: torch.Tensor, tasks: list[ClientTask], hp: ClientHParams) -> torch.Tensor:
    """[K, num_classes]: each task's training samples per class (what label-skew objectives calibrate with)."""
    return torch.stack([torch.bincount(y[torch.from_numpy(np.asarray(t.indices, dtype=np.int64))],
                                       minlength=hp.num_classes) for t in tasks])


def own_states(objective: Objective, ctx: RoundContext, tasks: list[ClientTask], param_names) -> list[State]:
    """Each task's persistent objective state, or the objective's initial one for a client new to it."""
    start = {k: ctx.global_state[k] for k in param_names}
    return [t.own.get("objective") or objective.client_init(start) for t in tasks]


def make_optimizer(params, hp: ClientHParams, lr: float | None = None) -> torch.optim.Optimizer:
    # SGD and Adam add weight decay to the gradient (coupled, L2); AdamW decays the weights directly
    # (decoupled, Loshchilov & Hutter 2019). foreach=True: one multi-tensor kernel per update step instead of a
    # Python loop over parameters (torch picks it only for GPU tensors by default); the same element-wise
    # operations, so bit for bit the same numbers (tests/test_algorithms.py compares with plain torch SGD),
    # and about 0.7 ms less per step on CPU (a tenth of a batch-32 step of mobilenet-like).
    lr = hp.lr if lr is None else lr
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay, foreach=True)
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=hp.weight_decay, foreach=True)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=hp.weight_decay, foreach=True)
    raise ValueError(f"client.optimizer: unknown optimizer {hp.optimizer!r}")


def epoch_orders(hp: ClientHParams, round_: int, client_id: int, n: int) -> list[np.ndarray]:
    """The client's minibatch order for every local epoch: a permutation per epoch, seeded by round and client."""
    rng = seeding.rng(hp.seed, seeding.CLIENT, round_, client_id)
    return [rng.permutation(n) for _ in range(hp.epochs)]


def local_update(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: RoundContext,
                 task: ClientTask, hp: ClientHParams) -> ClientResult:
    """One client's round on the device of ``model`` and ``x``, ``y`` (``engine.device``); the result on the CPU."""
    t0 = time.perf_counter()
    raise_if_injected(task, hp)
    device = x.device
    load_state(model, start_state(ctx, task, hp))
    model.train()
    params = dict(model.named_parameters())
    objective = client_objective(hp)
    own = to_device(own_states(objective, ctx, [task], params)[0], device)
    objective.begin(ClientSetup({k: p.detach()[None] for k, p in params.items()}, to_device(ctx.global_state, device),
                                to_device(ctx.payload, device), {k: v[None] for k, v in own.items()},
                                label_counts(y, [task], hp)))
    corrects = type(objective).correct is not Objective.correct
    optimizer = make_optimizer(params.values(), hp, hp.lr * ctx.lr_scale)
    # Dropout draws from the CPU default generator. torch.manual_seed would also queue lazy seeding of every
    # accelerator backend, recording a Python stack trace for each (2 ms per client, measured); same CPU state.
    torch_seed = seeding.torch_seed(hp.seed, seeding.TORCH, ctx.round, task.client_id)
    torch.default_generator.manual_seed(torch_seed)
    seed_device(device, torch_seed)
    aug_gen = torch.Generator().manual_seed(seeding.torch_seed(hp.seed, seeding.CLIENT, ctx.round, task.client_id))

    indices = torch.from_numpy(np.asarray(task.indices, dtype=np.int64))
    n = len(indices)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    steps = 0
    for order in epoch_orders(hp, ctx.round, task.client_id, n):
        rows = indices[torch.from_numpy(order)].to(device)
        for start in range(0, n, hp.batch_size):
            batch = rows[start : start + hp.batch_size]
            xb, yb = x[batch], y[batch]
            if hp.augment:
                xb = random_affine(xb, aug_gen, hp.augment_shift, hp.augment_rotate)
            if hp.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            loss = objective.loss(model(xb)[None], yb[None]).mean()
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            if corrects:
                objective.correct({k: p.grad[None] for k, p in params.items() if p.grad is not None})
            optimizer.step()
            loss_sum += loss.detach() * len(batch)
            steps += 1

    new_own, upload = objective.end(torch.tensor([steps], device=device)).client(0)
    if device.type != "cpu":
        new_own, upload = to_cpu(new_own), to_cpu(upload)
    final = to_cpu({k: v for k, v in model.state_dict().items() if v.is_floating_point()})  # a copy, not a view
    return client_result(task, hp, final, float(loss_sum), steps, new_own, upload, time.perf_counter() - t0)
