"""The round loop: one path for every run, centralized baseline and federated alike.

    plan_round: sample clients -> their tasks and the round's context
    (an engine, or Flower's SuperNodes, run the clients' local updates)
    finish_round: server aggregates -> norm policy -> running average -> evaluate -> metrics row -> callbacks ->
    files and checkpoint

``plan_round`` / ``finish_round`` are the round as a public API: ``Experiment.step`` runs a round with the
engine between them; the exported Flower strategy (``fedgap.export.flower_app``) runs them around Flower's own
message exchange; tests call them with constructed client results. The server carries one ``ServerState``
(``fedgap.fl.aggregate``) between rounds, and a checkpoint saves exactly that object.

Aggregation (what is averaged and why):
- The server averages the clients' final floating-point state, weighted by client sample counts, in client-id
  order. Parameters go through the server optimizer as the pseudo-gradient mean(y_i) - x; floating buffers
  (BatchNorm running statistics) become the weighted mean directly (see ``fedgap.fl.server``).
- Integer buffers (BatchNorm's num_batches_tracked) are not averaged: they count steps, and with a fixed BN
  momentum they never enter the math.
- Norm layers follow ``model.norm_policy`` (``fedgap.fl.normpolicy``): ``average`` treats them like the rest;
  ``local`` keeps each client's own copy across rounds (the global model carries their average, used for
  its evaluation); ``recalibrate`` replaces the averaged running statistics with exact federated ones.
- ``server.average`` (off by default): the model evaluated, and the one a deployment would use, is a running
  average of the round models (``fedgap.fl.averaging``); the clients always train from the round's own model.

Randomness is indexed by (seed, round, client) (``fedgap.seeding``), and a checkpoint holds the complete
server state (model, server optimizer, control variates, per-client state, the running average) and the
metrics so far, so a resumed run ends with the same metrics and weights as an uninterrupted one.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedgap import seeding
from fedgap.callbacks import RoundCallback
from fedgap.config import Config, dump_yaml
from fedgap.data.datasets import Dataset, load_dataset
from fedgap.data.partition import partition_for, validation_rows
from fedgap.engines import Engine, RoundOutput, engine_class
from fedgap.errors import FedgapError
from fedgap.experiment import checkpoint, outputs
from fedgap.experiment.stopping import StopAtTarget, StopOnDivergence
from fedgap.experiment.summary import run_summary
from fedgap.fl import fednova
from fedgap.fl.aggregate import ServerComponents, ServerState, server_update
from fedgap.fl.averaging import average_update
from fedgap.fl.batchnorm import batchnorm_layers
from fedgap.fl.client import ClientHParams, ClientResult, ClientTask, RoundContext, client_objective
from fedgap.fl.device import check_device
from fedgap.fl.evaluate import label_matched_accuracy
from fedgap.fl.normpolicy import norm_policy
from fedgap.fl.server import make_server_optimizer, server_lr
from fedgap.fl.state import State, clone, digest
from fedgap.models import build_model
from fedgap.models.norm import float_norm_keys
from fedgap.progress import RunProgress

PERSONAL_TEST_SIZE = 1000


class RunStopped(FedgapError):
    """Too few clients survived a round; the last checkpoint is resumable."""

    exit_code = 3


@dataclass(frozen=True)
class RunView:
    """The read-only part of a run that callbacks may use (not the whole Experiment)."""

    cfg: Config
    data: Dataset
    parts: list[np.ndarray]  # training rows of every client
    engine: Engine  # for evaluation passes (``evaluate``, ``evaluate_test``, ``model``)
    param_keys: list[str]
    bn_layers: list[str]
    rows: list[dict[str, Any]]  # the metrics rows of the rounds before (read only)


@dataclass
class RoundPlan:
    """One round as the server plans it: which clients train (their tasks) and from what (the context)."""

    round: int
    tasks: list[ClientTask]
    context: RoundContext
    started: float = field(default_factory=time.perf_counter)  # the row's seconds cover the whole round


@dataclass
class RoundInfo:
    """What callbacks see at the end of a round."""

    round: int
    run: RunView
    tasks: list[ClientTask]
    output: RoundOutput
    previous_state: State
    state: State
    evaluated: bool
    row: dict[str, Any] = field(default_factory=dict)


def sample_clients(seed: int, round_: int, num_clients: int, k: int) -> np.ndarray:
    """The clients of a round: k of num_clients without replacement, seeded by round, sorted."""
    if k >= num_clients:
        return np.arange(num_clients)
    return np.sort(seeding.rng(seed, seeding.SAMPLING, round_).choice(num_clients, size=k, replace=False))


def initial_model(cfg: Config, data: Dataset) -> torch.nn.Module:
    torch.manual_seed(seeding.torch_seed(cfg.seed, seeding.INIT))
    return build_model(cfg.model, data.image_shape, data.num_classes)


class Experiment:
    def __init__(self, cfg: Config, out: str | Path | None = None, *, resume: bool = False,
                 overwrite: bool = False, callbacks: Sequence[RoundCallback] = (), show_progress: bool = True,
                 progress=None, label: str | None = None):
        self.cfg = cfg
        self.out = Path(out) if out is not None else None
        self.callbacks = list(callbacks) + [StopOnDivergence()]
        if cfg.eval.stop_at_target:
            self.callbacks.append(StopAtTarget(cfg.eval.target))
        if cfg.eval.diagnostics:
            from fedgap.experiment.diagnostics import Diagnostics

            self.callbacks.append(Diagnostics())
        self.label = label or ("central" if cfg.data.partition == "central" else cfg.server.algorithm)
        if cfg.track.tensorboard or cfg.track.mlflow:  # experiment tracking (fedgap.track), off by default
            from fedgap.track import make_trackers

            self.callbacks += make_trackers(cfg, self.out, self.label)
        self.show_progress, self.shared_progress = show_progress, progress
        self._lock: outputs.RunLock | None = None
        t0 = time.perf_counter()
        # Data, partition and model first: a bad data file, partition or model must fail before --out is touched.
        self.data = load_dataset(cfg.data.name, cfg.data.root, cfg.data.path)
        check_device(cfg.engine.device)  # a device this machine lacks: one line, before --out is touched
        d = cfg.data
        self.parts = partition_for(d, self.data.train_y.numpy(), cfg.seed)
        # Held-out training rows (data.validation): what selection (the doctor's tuning) reads, never the test set.
        val = torch.from_numpy(validation_rows(d, self.data.train_y.numpy(), cfg.seed))
        self.val_x, self.val_y = self.data.train_x[val], self.data.train_y[val]
        model = initial_model(cfg, self.data)
        if self.out is not None:
            self._lock = outputs.prepare_out_dir(self.out, resume=resume, overwrite=overwrite)
        self.param_keys = [k for k, _ in model.named_parameters()]
        self.batchnorms = list(batchnorm_layers(model).values())  # what recalibration writes (keys, conventions)
        self.bn_layers = [bn.name for bn in self.batchnorms]
        self.norm_keys = float_norm_keys(model)
        # What the server optimizer steps. Under the local policy (FedBN) the global norm layers only serve the
        # global model's evaluation and are their clients' weighted mean, like the running statistics.
        self.norm_policy = norm_policy(cfg.model.norm_policy)
        self.server_keys = self.norm_policy.stepped(self.param_keys, self.norm_keys)
        self.hp = ClientHParams.from_config(cfg, self.norm_keys, self.data.num_classes)
        self.objective = client_objective(self.hp)
        self.server_opt = make_server_optimizer(cfg.server)
        self.components = ServerComponents(self.server_opt, self.objective, tuple(self.server_keys),
                                           cfg.data.num_clients, fednova.normalizer(cfg))

        state = clone(model.state_dict())
        self.initial_digest = digest(state)  # summary.json: the same seed and config start from the same weights
        params = {k: state[k] for k in self.param_keys}
        self.server = ServerState(  # everything the server carries between rounds: what a checkpoint holds
            model=state, optimizer=self.server_opt.init({k: params[k].double() for k in self.server_keys}),
            objective=self.objective.server_init(params), clients={})
        self.rows: list[dict[str, Any]] = []
        self.round = 0
        self.wall_seconds = 0.0
        if resume:
            self._load_checkpoint()
        self.engine: Engine = engine_class(cfg.engine.name)(cfg, self.data, self.hp)
        self.startup_seconds = time.perf_counter() - t0  # engine start is timed in run()

    # ------------------------------------------------------------------------------------------------ running
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        total = cfg.server.rounds
        if self.out is not None:
            outputs.atomic_write_text(self.out / outputs.CONFIG, dump_yaml(cfg))
        finished = self.round >= total or self.stopped_early()
        if finished and self.out is not None and (self.out / outputs.SUMMARY).exists():
            self._release()
            return self.summary()
        bar = RunProgress(self.label, total, self.round, self.shared_progress, self.show_progress)
        previous = _install_sigterm()
        t_start = time.perf_counter()
        summary = None
        try:
            self.engine.start()
            self.startup_seconds += time.perf_counter() - t_start
            while self.round < total and not self.stopped_early():
                row = self.step()
                acc = row.get("test_accuracy")
                bar.update(self.round, f"acc {acc:.2%}" if acc is not None else "")
            if self.round < total and self.out is not None:
                self._save_checkpoint()  # stopped early (target or divergence): the checkpoint holds the final model
            summary = self.summary()
            if self.out is not None:
                outputs.write_json(self.out / outputs.SUMMARY, summary)
        finally:
            bar.close()
            self.engine.close()
            self._release()
            signal.signal(signal.SIGTERM, previous)
            for callback in self.callbacks:  # summary is None if the run did not finish
                callback.on_run_end(self.view(), summary)
        return summary

    def _release(self) -> None:
        """Give up the lock on --out (the run is over, finished or not)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def step(self) -> dict[str, Any]:
        """One round on this run's engine: returns its metrics row."""
        plan = self.plan_round()
        t_train = time.perf_counter()
        output = self.engine.train(plan.context, plan.tasks)
        return self.finish_round(plan, output, train_seconds=time.perf_counter() - t_train)

    # ------------------------------------------------------------------------------------------------ the round
    def plan_round(self) -> RoundPlan:
        """The next round: its sampled clients' tasks (each with its own state from earlier rounds) and the
        context every client trains from (the global model, the objective's payload, the client lr scale)."""
        cfg, r = self.cfg, self.round + 1
        sampled = sample_clients(cfg.seed, r, cfg.data.num_clients, cfg.server.clients_per_round)
        tasks = [ClientTask(int(c), self.parts[c], dict(self.server.clients.get(int(c), {}))) for c in sampled]
        context = RoundContext(r, self.server.model, self.objective.payload(self.server.objective),
                               lr_scale=self.hp.lr_scale(r))
        return RoundPlan(r, tasks, context)

    def finish_round(self, plan: RoundPlan, output: RoundOutput, train_seconds: float | None = None) -> dict[str, Any]:
        """Close round ``plan.round`` with the surviving clients' results: the new server state, its evaluation,
        the metrics row (returned, appended to ``rows`` and written out with the checkpoint), the callbacks."""
        cfg, r = self.cfg, plan.round
        if r != self.round + 1:
            raise ValueError(f"finish_round: round {r} given, round {self.round + 1} expected")
        if train_seconds is None:
            train_seconds = time.perf_counter() - plan.started
        if len(output.results) < cfg.server.min_clients:
            first = output.failures[0].reason if output.failures else "no client ran"
            raise RunStopped(
                f"round {r}: {len(output.results)} of {len(plan.tasks)} clients survived, fewer than "
                f"server.min_clients={cfg.server.min_clients} (first failure: {first}); the run stopped after "
                f"round {self.round} and can be resumed with --resume"
            )
        previous = self.server
        self.server = self.aggregate(output.results, r)
        # A non-finite weight never recovers: stop here (evaluated, so the row shows it) instead of spending
        # the remaining rounds on NaN.
        diverged = not all(torch.isfinite(v).all() for v in self.server.model.values() if v.is_floating_point())
        evaluated = r % cfg.eval.every == 0 or r == cfg.server.rounds or diverged
        row = self._row(r, output, train_seconds, evaluated, diverged)
        info = RoundInfo(r, self.view(), plan.tasks, output, previous.model, self.server.model, evaluated, row)
        for callback in self.callbacks:
            row.update(callback.on_round_end(info))
        row["seconds"] = time.perf_counter() - plan.started  # the whole round with its evaluation and diagnostics
        self.wall_seconds += row["seconds"]
        self.rows.append(row)
        self.round = r
        if self.out is not None:
            outputs.write_metrics(self.out / outputs.METRICS, self.rows)
            if r % cfg.checkpoint.every == 0 or r == cfg.server.rounds:
                self._save_checkpoint()
        return row

    def aggregate(self, results: list[ClientResult], round_: int) -> ServerState:
        """The server state after round ``round_`` with these client results (the current one is not changed):
        the server update (weighted mean, server optimizer, objective), the norm policy, the running average."""
        new = server_update(self.server, results, self.components, server_lr(self.cfg.server, round_))
        parts = [self.parts[res.client_id] for res in results]
        model = self.norm_policy.after_aggregation(
            new.model, lambda st, layer: self.engine.layer_moments(st, layer, parts), self.batchnorms)
        eta = self.cfg.server.average
        return replace(new, model=model,
                       average=None if eta is None else average_update(new.average, model, eta, round_))

    def _row(self, r: int, output: RoundOutput, train_seconds: float, evaluated: bool,
             diverged: bool) -> dict[str, Any]:
        """The round's metrics row (``seconds`` is filled in last, after the callbacks)."""
        model = self.server.evaluated() if evaluated else None
        test = self.engine.evaluate_test(model) if evaluated else None
        val = self.engine.evaluate(model, self.val_x, self.val_y) if evaluated and len(self.val_y) else None
        results = output.results
        row: dict[str, Any] = {
            "round": r,
            "test_accuracy": test.accuracy if test else None,
            "test_loss": test.loss if test else None,
            "train_loss": float(np.average([x.train_loss for x in results], weights=[x.samples for x in results])),
            "seconds": None,
            "samples": int(sum(x.samples for x in results)),
            "clients": len(results),
            "clients_failed": len(output.failures),
            "train_seconds": train_seconds,
        }
        if len(self.val_y):
            row["val_accuracy"] = val.accuracy if val else None
            row["val_loss"] = val.loss if val else None
        if diverged:
            row["diverged"] = True
        if self.norm_policy.personal:
            row["personal_accuracy"] = self._personal_accuracy(results) if evaluated else None
        return row

    def _personal_accuracy(self, results: list[ClientResult]) -> float | None:
        """FedBN: each sampled client's own model (global weights, its norm layers) on a test subset drawn
        with that client's label proportions; the mean over clients. None where the server does not hold the
        clients' norm layers (a Flower deployment keeps them on the clients)."""
        owns = [self.server.clients.get(res.client_id, {}).get("norm") for res in results]
        if any(own is None for own in owns):
            return None
        train_y = self.data.train_y.numpy()
        accs = [label_matched_accuracy(self.engine.evaluate, {**self.server.model, **own}, self.data.test_x,
                                       self.data.test_y, train_y[self.parts[res.client_id]], PERSONAL_TEST_SIZE,
                                       self.cfg.seed, res.client_id)
                for res, own in zip(results, owns, strict=True)]
        return float(np.mean([a for a in accs if a is not None]))

    # ------------------------------------------------------------------------------------------------ results
    def view(self) -> RunView:
        """What callbacks see of this run."""
        return RunView(self.cfg, self.data, self.parts, self.engine, self.param_keys, self.bn_layers, self.rows)

    def stop_reason(self) -> str | None:
        """Why the run ended before server.rounds (a callback's stop rule: target, divergence), or None."""
        return next((why for cb in self.callbacks for why in [cb.stop_reason(self.rows)] if why), None)

    def stopped_early(self) -> bool:
        return self.stop_reason() is not None

    def diverged_at(self) -> int | None:
        """The round after which the global model held a non-finite weight (the run stopped there), or None."""
        return StopOnDivergence.diverged_at(self.rows)

    def summary(self) -> dict[str, Any]:
        return run_summary(self.cfg, self.rows, self.round, self.wall_seconds, self.startup_seconds,
                           has_validation=bool(len(self.val_y)), personal=self.norm_policy.personal,
                           initial_digest=self.initial_digest)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self) -> None:
        checkpoint.save(self.out, self.cfg, self.round, self.server, self.rows, self.wall_seconds)

    def _load_checkpoint(self) -> None:
        if self.out is None:
            raise FedgapError("--resume needs --out DIR")
        saved = checkpoint.load(self.out, self.cfg)
        self.round, self.server, self.rows, self.wall_seconds = saved.round, saved.server, saved.rows, saved.wall
        if self.round < self.cfg.server.rounds:
            (self.out / outputs.SUMMARY).unlink(missing_ok=True)  # extended: no longer finished


def _install_sigterm():
    """Turn SIGTERM into KeyboardInterrupt so a killed run says how to resume instead of dying silently."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return signal.getsignal(signal.SIGTERM)


def run_experiment(cfg: Config, out: str | Path | None = None, **kwargs) -> dict[str, Any]:
    return Experiment(cfg, out, **kwargs).run()


__all__ = ["Experiment", "RoundCallback", "RoundInfo", "RoundPlan", "RunStopped", "run_experiment",
           "sample_clients"]
