"""The round loop: one path for every run, centralized baseline and federated alike.

    sample clients -> engine runs their local updates -> server aggregates -> norm policy -> evaluate ->
    log a metrics row -> callbacks -> checkpoint

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
server state (model, server optimizer, control variates, per-client state, the running average, metrics so
far), so a resumed run ends with the same metrics and weights as an uninterrupted one.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fedgap import __version__, seeding
from fedgap.config import RESULT_NEUTRAL, Config, config_hash, config_to_dict, dump_yaml, results_hash
from fedgap.data.datasets import Dataset, load_dataset
from fedgap.data.partition import partition_for, validation_rows
from fedgap.engines import Engine, RoundOutput, engine_class
from fedgap.errors import FedgapError
from fedgap.experiment import outputs
from fedgap.experiment.stopping import StopAtTarget, StopOnDivergence
from fedgap.fl import fednova
from fedgap.fl.aggregate import ServerComponents, ServerState, server_update
from fedgap.fl.averaging import as_model, average_update
from fedgap.fl.client import ClientHParams, ClientResult, ClientTask, RoundContext, client_objective
from fedgap.fl.evaluate import evaluate, label_matched_subset
from fedgap.fl.normpolicy import norm_policy
from fedgap.fl.server import make_server_optimizer, server_lr
from fedgap.fl.state import State, clone
from fedgap.models import build_model
from fedgap.models.norm import batchnorm_modules, float_norm_keys
from fedgap.progress import RunProgress

CHECKPOINT_FORMAT = 1
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


class RoundCallback(Protocol):
    """Called after every round. May also define ``stop_reason(rows) -> str | None``: a reason to end the run
    after this round (``fedgap.experiment.stopping``), and ``on_run_end(view, summary)``: called once when the
    run ends, finished or not (summary None then; the trackers close their runs there)."""

    def on_round_end(self, info: RoundInfo) -> dict[str, Any]:
        """Return extra metrics-row columns (may be empty)."""


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
        self.resume = resume
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
        # Data and partition first: a bad data file or partition setting must fail before --out is touched.
        self.data = load_dataset(cfg.data.name, cfg.data.root, cfg.data.path)
        d = cfg.data
        self.parts = partition_for(d, self.data.train_y.numpy(), cfg.seed)
        # Held-out training rows (data.validation): what selection (the doctor's tuning) reads, never the test set.
        val = torch.from_numpy(validation_rows(d, self.data.train_y.numpy(), cfg.seed))
        self.val_x, self.val_y = self.data.train_x[val], self.data.train_y[val]
        if self.out is not None:
            self._lock = outputs.prepare_out_dir(self.out, resume=resume, overwrite=overwrite)
        model = initial_model(cfg, self.data)
        self.param_keys = [k for k, _ in model.named_parameters()]
        self.bn_layers = list(batchnorm_modules(model))
        self.norm_keys = float_norm_keys(model)
        # What the server optimizer steps. Under the local policy (FedBN) the global norm layers only serve the
        # global model's evaluation and are their clients' weighted mean, like the running statistics.
        self.norm_policy = norm_policy(cfg.model.norm_policy)
        self.server_keys = self.norm_policy.stepped(self.param_keys, self.norm_keys)
        self.hp = ClientHParams.from_config(cfg, self.norm_keys, self.data.num_classes)
        self.objective = client_objective(self.hp)
        self.server_opt = make_server_optimizer(cfg.server)

        # The complete server state: everything a checkpoint must hold.
        self.state: State = clone(model.state_dict())
        params = {k: self.state[k] for k in self.param_keys}
        self.server_state: State = self.server_opt.init({k: params[k].double() for k in self.server_keys})
        self.objective_state: State = self.objective.server_init(params)
        self.client_store: dict[int, dict[str, State]] = {}
        self.average: State | None = None  # server.average: the running average of the round models (float64)
        self.components = ServerComponents(self.server_opt, self.objective, tuple(self.server_keys),
                                           cfg.data.num_clients, fednova.normalizer(cfg))
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
            for callback in self.callbacks:  # optional end hook (trackers); summary is None if the run did not finish
                getattr(callback, "on_run_end", lambda *_: None)(self.view(), summary)
        return summary

    def _release(self) -> None:
        """Give up the lock on --out (the run is over, finished or not)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def step(self) -> dict[str, Any]:
        """One round: returns its metrics row (also appended to self.rows and written out)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        r = self.round + 1
        sampled = sample_clients(cfg.seed, r, cfg.data.num_clients, cfg.server.clients_per_round)
        tasks = [ClientTask(int(c), self.parts[c], self.client_store.get(int(c), {})) for c in sampled]
        ctx = RoundContext(r, self.state, self.objective.payload(self.objective_state),
                           lr_scale=self.hp.lr_scale(r))
        t_train = time.perf_counter()
        output = self.engine.train(ctx, tasks)
        train_seconds = time.perf_counter() - t_train
        if len(output.results) < cfg.server.min_clients:
            first = output.failures[0].reason if output.failures else "no client ran"
            raise RunStopped(
                f"round {r}: {len(output.results)} of {len(tasks)} clients survived, fewer than "
                f"server.min_clients={cfg.server.min_clients} (first failure: {first}); the run stopped after "
                f"round {self.round} and can be resumed with --resume"
            )
        previous = self.state
        self.state = self._aggregate(output.results)
        parts = [self.parts[res.client_id] for res in output.results]
        self.state = self.norm_policy.after_aggregation(
            self.state, lambda st, layer: self.engine.layer_moments(st, layer, parts), self.bn_layers)
        self.update_average(r)

        # A non-finite weight never recovers: stop here (evaluated, so the row shows it) instead of spending
        # the remaining rounds on NaN.
        diverged = not all(torch.isfinite(v).all() for v in self.state.values() if v.is_floating_point())
        evaluated = r % cfg.eval.every == 0 or r == cfg.server.rounds or diverged
        model = self.evaluated_state() if evaluated else None
        test = self.engine.evaluate_test(model) if evaluated else None
        val = self.engine.evaluate(model, self.val_x, self.val_y) if evaluated and len(self.val_y) else None
        row: dict[str, Any] = {
            "round": r,
            "test_accuracy": test.accuracy if test else None,
            "test_loss": test.loss if test else None,
            "train_loss": float(np.average([x.train_loss for x in output.results],
                                           weights=[x.samples for x in output.results])),
            "seconds": None,
            "samples": int(sum(x.samples for x in output.results)),
            "clients": len(output.results),
            "clients_failed": len(output.failures),
            "train_seconds": train_seconds,
        }
        if len(self.val_y):
            row["val_accuracy"] = val.accuracy if val else None
            row["val_loss"] = val.loss if val else None
        if diverged:
            row["diverged"] = True
        if self.norm_policy.personal:
            row["personal_accuracy"] = self._personal_accuracy(output.results) if evaluated else None
        info = RoundInfo(r, self.view(), tasks, output, previous, self.state, evaluated, row)
        for callback in self.callbacks:
            row.update(callback.on_round_end(info))
        row["seconds"] = time.perf_counter() - t0  # the whole round with its evaluation and diagnostics
        self.wall_seconds += row["seconds"]
        self.rows.append(row)
        self.round = r
        if self.out is not None:
            outputs.write_metrics(self.out / outputs.METRICS, self.rows)
            if r % cfg.checkpoint.every == 0 or r == cfg.server.rounds:
                self._save_checkpoint()
        return row

    # ------------------------------------------------------------------------------------------------ server
    def _aggregate(self, results: list[ClientResult]) -> State:
        before = ServerState(self.state, self.server_state, self.objective_state, self.client_store)
        after = server_update(before, results, self.components, server_lr(self.cfg.server, self.round + 1))
        self.server_state, self.objective_state, self.client_store = after.optimizer, after.objective, after.clients
        return after.model

    def update_average(self, round_: int) -> None:
        """server.average: fold the round's global model into the running average (fedgap.fl.averaging)."""
        if self.cfg.server.average is not None:
            self.average = average_update(self.average, self.state, self.cfg.server.average, round_)

    def evaluated_state(self) -> State:
        """The model the server evaluates and hands out: the running average under server.average, else the
        round's global model (which training continues from in either case)."""
        return self.state if self.average is None else as_model(self.average, self.state)

    def _personal_accuracy(self, results: list[ClientResult]) -> float:
        """FedBN: each sampled client's own model (global weights, its norm layers) on a test subset drawn
        with that client's label proportions; the mean over clients."""
        test_y = self.data.test_y.numpy()
        train_y = self.data.train_y.numpy()
        accs = []
        for res in results:
            rows = label_matched_subset(test_y, train_y[self.parts[res.client_id]], PERSONAL_TEST_SIZE,
                                        self.cfg.seed, res.client_id)
            own = {**self.state, **self.client_store[res.client_id].get("norm", {})}
            idx = torch.from_numpy(rows)
            accs.append(evaluate(self.engine.model, own, self.data.test_x[idx], self.data.test_y[idx]).accuracy)
        return float(np.mean(accs))

    # ------------------------------------------------------------------------------------------------ results
    def view(self) -> RunView:
        """What callbacks see of this run."""
        return RunView(self.cfg, self.data, self.parts, self.engine, self.param_keys, self.bn_layers, self.rows)

    def stop_reason(self) -> str | None:
        """Why the run ended before server.rounds (a callback's stop rule: target, divergence), or None."""
        return next((why for cb in self.callbacks if hasattr(cb, "stop_reason")
                     for why in [cb.stop_reason(self.rows)] if why), None)

    def stopped_early(self) -> bool:
        return self.stop_reason() is not None

    def diverged_at(self) -> int | None:
        """The round after which the global model held a non-finite weight (the run stopped there), or None."""
        return StopOnDivergence.diverged_at(self.rows)

    def summary(self) -> dict[str, Any]:
        accs = [(r["round"], r["test_accuracy"]) for r in self.rows if r.get("test_accuracy") is not None]
        target = self.cfg.eval.target
        reached = next((rnd for rnd, a in accs if a >= target), None)
        samples = sum(r["samples"] for r in self.rows)
        train_seconds = sum(r.get("train_seconds") or 0.0 for r in self.rows)
        final = self.rows[-1] if self.rows else {}
        summary = {
            "final_test_accuracy": accs[-1][1] if accs else None,
            "best_test_accuracy": max(a for _, a in accs) if accs else None,
            "final_test_loss": final.get("test_loss"),
            "rounds_completed": self.round,
            "rounds_to_target": reached,
            "diverged_at_round": self.diverged_at(),
            "target_accuracy": target,
            "wall_seconds": self.wall_seconds + self.startup_seconds,
            "seconds_per_round": self.wall_seconds / max(len(self.rows), 1),
            "startup_seconds": self.startup_seconds,
            "train_samples": samples,
            "train_samples_per_second": samples / train_seconds if train_seconds > 0 else None,
            "clients_failed": sum(r.get("clients_failed", 0) for r in self.rows),
            "engine": self.cfg.engine.name,
            "intra_op_threads": torch.get_num_threads(),  # of this process (a parallel engine's workers use 1)
            "config_hash": results_hash(self.cfg),
            "fedgap_version": __version__,
        }
        if len(self.val_y):
            vals = [r["val_accuracy"] for r in self.rows if r.get("val_accuracy") is not None]
            summary["final_val_accuracy"] = vals[-1] if vals else None
            summary["best_val_accuracy"] = max(vals) if vals else None
        if self.norm_policy.personal:
            personal = [r["personal_accuracy"] for r in self.rows if r.get("personal_accuracy") is not None]
            summary["final_personal_accuracy"] = personal[-1] if personal else None
        return summary

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self) -> None:
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(self.cfg),
            "resume_hash": _resume_hash(self.cfg),
            "round": self.round,
            "state": self.state,
            "server_state": self.server_state,
            "objective_state": self.objective_state,
            "client_store": self.client_store,
            "average": self.average,
            "rows": self.rows,
            "wall_seconds": self.wall_seconds,
        }
        outputs.save_checkpoint(self.out / outputs.CHECKPOINT, payload)

    def _load_checkpoint(self) -> None:
        if self.out is None:
            raise FedgapError("--resume needs --out DIR")
        ckpt = outputs.load_checkpoint(self.out / outputs.CHECKPOINT)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise FedgapError(f"checkpoint '{self.out / outputs.CHECKPOINT}': written by another fedgap version")
        if ckpt["resume_hash"] != _resume_hash(self.cfg):
            raise FedgapError(
                f"--resume: the config differs from the one of the run in '{self.out}' (only server.rounds, "
                f"eval.every, engine.* and checkpoint.* may change); start a new --out instead"
            )
        self.round = ckpt["round"]
        self.state = ckpt["state"]
        self.server_state = ckpt["server_state"]
        self.objective_state = ckpt["objective_state"]
        self.client_store = ckpt["client_store"]
        self.average = ckpt.get("average")  # absent in checkpoints written before server.average existed
        self.rows = ckpt["rows"]
        self.wall_seconds = ckpt["wall_seconds"]
        if self.round < self.cfg.server.rounds:
            (self.out / outputs.SUMMARY).unlink(missing_ok=True)  # extended: no longer finished


def _resume_hash(cfg: Config) -> str:
    """What must not change between a run and its resumption (more rounds are allowed)."""
    return config_hash(cfg, exclude=RESULT_NEUTRAL + (("server", "rounds"), ("eval", "every")))


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


__all__ = ["Experiment", "RoundCallback", "RoundInfo", "RunStopped", "run_experiment", "sample_clients"]
