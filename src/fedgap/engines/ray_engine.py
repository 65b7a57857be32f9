"""The Ray engine: the same client updates on a Ray cluster (or a private Ray on this machine).

Why it is shaped this way:
- **Long-lived actors** (``engine.workers`` of them, default: the cluster's CPUs / ``engine.cpus_per_client``),
  started once per run, each a ``ClientRunner`` in its own process (``fedgap.engines.ray_actor``) holding the data
  set, loaded once on its node, and one model, with one intra-op thread per CPU it reserves: starting a process,
  importing torch and loading MNIST costs seconds, a client update a fraction of one. On a Ray connection this
  process borrowed (see below) finished runs leave their actors to the next run.
- **The global state goes into the object store once per round** (``ray.put``); every task gets the same
  reference and an actor deserializes it once per round, however many clients it runs. Only a client's own
  pieces (its row indices, its SCAFFOLD variate or FedBN norm layers) travel with its task.
- **Largest client first, one task in flight per actor**, the next one handed to whichever actor frees up first,
  so a big client does not start last and leave the others idle (the straggler effect).
- **Failures.** A client that raises, or whose actor dies, is retried up to ``engine.max_retries`` times on a
  healthy actor (Ray restarts a dead actor, ``max_restarts=-1``; it takes tasks again once it answers a probe,
  and is given up after ``RESTART_TIMEOUT``); then it is reported in ``RoundOutput.failures`` and the round loop
  aggregates the survivors, or stops the run with a resumable checkpoint when fewer than ``server.min_clients``
  survive.
- **Results never depend on the engine**: an actor runs exactly ``local_update`` and the loop aggregates the
  results sorted by client id, so the same seed gives the same model as the sequential engine (bit for bit when
  that runs one thread too; see docs/ray.md).

Fault injection (tests): ``engine.fail_clients`` raise in ``local_update`` on every attempt, so they end dropped;
with ``engine.crash_clients`` the actor running such a client's *first attempt of a round* exits its process
(``os._exit(1)``, as a segfault or the OOM killer would end it), so with ``engine.max_retries >= 1`` the retry runs
on a healthy actor and the round equals one without failures; with ``max_retries=0`` the client is dropped.

Connections: if this process already has a Ray connection (a notebook, a test fixture), the engine borrows it and
leaves it running; otherwise ``engine.address=local`` starts a private Ray (loopback only, shut down by
``close()``) and ``auto`` / ``host:port`` / ``ray://host:port`` joins an existing cluster.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque

import torch

from fedgap.engines import ray_actor
from fedgap.engines.base import Engine, RoundOutput
from fedgap.engines.ray_actor import ClientActor, import_ray, init_local_ray
from fedgap.engines.ray_address import check_reachable, first_line, host_port, ray_error_line
from fedgap.engines.results import ClientFailure
from fedgap.engines.schedule import largest_first, slice_bounds
from fedgap.errors import ConfigError, FedgapError
from fedgap.fl.client import ClientTask, RoundContext
from fedgap.fl.evaluate import EvalResult
from fedgap.fl.state import State
from fedgap.runtime import tune_allocator

START_TIMEOUT = 600.0  # seconds for the actors to start (import torch, load the data set)
RESTART_TIMEOUT = 300.0  # a dead actor not back after this long is given up for the rest of the run
CLOSE_WAIT = 30.0  # at close on a kept connection, how long to wait for restarting actors to rejoin the pool
POLL_SECONDS = 0.05

__all__ = ["RayEngine", "init_local_ray"]


class RayEngine(Engine):
    name = "ray"

    def __init__(self, cfg, data, hp):
        super().__init__(cfg, data, hp)
        self._ray = import_ray()
        if cfg.engine.device != "cpu":
            raise ConfigError(f"engine.device: the ray engine trains on cpu (gpus_per_client only reserves GPUs "
                              f"for its actors), got {cfg.engine.device!r}")
        _host_port(cfg.engine.address)  # a malformed address fails before anything starts
        self._owns_ray = False
        self._pool_key: tuple | None = None
        self._spec: list = []  # [ref] of (config, client hyper-parameters, threads): what every actor builds
        self._actors: list = []
        self._idle: list[int] = []  # actor slots ready for a task, lowest slot first
        self._probes: dict = {}  # ready() ref of a dead actor being restarted -> (slot, first probe time)
        self._dead: set[int] = set()
        self.worker_deaths = 0  # actor deaths seen during the run (crashes, OOM kills, lost nodes)
        self.retries = 0  # client tasks run again after a failure

    # ------------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        ray, e = self._ray, self.cfg.engine
        tune_allocator()
        torch.set_num_threads(e.threads or os.cpu_count() or 1)  # evaluation fallbacks run here
        if not ray.is_initialized():
            self._connect()
        try:
            self._start_actors(self._worker_count())
        except BaseException:
            ray_actor.kill_all(ray, self._actors)
            self._actors, self._idle = [], []
            self.close()
            raise

    def _connect(self) -> None:
        ray, e = self._ray, self.cfg.engine
        if e.address == "local":
            init_local_ray(max(os.cpu_count() or 1, math.ceil((e.workers or 0) * e.cpus_per_client)))
        else:
            _check_reachable(e.address)
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            try:
                ray.init(address=e.address, log_to_driver=bool(os.environ.get("FEDGAP_DEBUG")),
                         logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                auth = "" if os.environ.get("RAY_AUTH_MODE") else (
                    "; a cluster with token authentication needs RAY_AUTH_MODE=token and its token")
                raise FedgapError(f"engine.address: cannot join the Ray cluster at {e.address!r} "
                                  f"({first_line(exc)}){auth}; start one with `ray start --head`") from None
        self._owns_ray = True

    def _worker_count(self) -> int:
        e = self.cfg.engine
        res = self._ray.cluster_resources()
        deadline = time.monotonic() + 10
        while not res.get("CPU") and time.monotonic() < deadline:  # a new Ray reports its nodes a moment later
            time.sleep(POLL_SECONDS)
            res = self._ray.cluster_resources()
        cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
        fit = int(cpus // e.cpus_per_client + 1e-9)
        if e.gpus_per_client > 0:
            if gpus < e.gpus_per_client:
                raise ConfigError(f"engine.gpus_per_client: {e.gpus_per_client:g} per actor, but the Ray cluster "
                                  f"has {gpus:g} GPUs")
            fit = min(fit, int(gpus // e.gpus_per_client + 1e-9))
        if fit < 1:
            raise ConfigError(f"engine.cpus_per_client: {e.cpus_per_client:g} per actor, but the Ray cluster has "
                              f"{cpus:g} CPUs")
        if e.workers is not None and e.workers > fit:
            raise ConfigError(f"engine.workers: {e.workers} actors with cpus_per_client={e.cpus_per_client:g} and "
                              f"gpus_per_client={e.gpus_per_client:g} do not fit the Ray cluster ({cpus:g} CPUs, "
                              f"{gpus:g} GPUs): at most {fit}")
        return e.workers or fit

    def _start_actors(self, n: int) -> None:
        ray, e = self._ray, self.cfg.engine
        threads = max(1, int(e.cpus_per_client))
        self._spec = [ray.put((self.cfg, self.hp, threads))]  # the Config pickles as it is
        self._pool_key = None if self._owns_ray else ray_actor.pool_key(ray, e.cpus_per_client, e.gpus_per_client)
        self._actors = ray_actor.take_pooled(ray, self._pool_key, n) if self._pool_key else []
        remote = ray.remote(max_restarts=-1, max_task_retries=0)(ClientActor)
        self._actors += [remote.options(num_cpus=e.cpus_per_client, num_gpus=e.gpus_per_client or None).remote()
                         for _ in range(n - len(self._actors))]
        try:
            ray.get([a.start.remote(self._spec) for a in self._actors], timeout=START_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            raise FedgapError(f"engine.name=ray: {n} actors did not start within {START_TIMEOUT:.0f} s (does the "
                              f"cluster have {e.cpus_per_client:g} free CPUs per actor?)") from None
        except ray.exceptions.RayError as exc:
            raise FedgapError(f"engine.name=ray: a worker could not start: {ray_error_line(exc)}") from None
        self._idle = list(range(n))

    def close(self) -> None:
        ray = self._ray
        if ray.is_initialized() and self._actors:
            if self._pool_key:  # an actor Ray is restarting serves the next run sooner than a new process
                self._settle_probes(CLOSE_WAIT)
            healthy = [self._actors[s] for s in sorted(self._idle)]
            broken = [a for s, a in enumerate(self._actors) if s not in self._idle]
            ray_actor.kill_all(ray, broken)
            if self._pool_key:
                ray_actor.give_back(self._pool_key, healthy)
            else:
                ray_actor.kill_all(ray, healthy)
        self._actors, self._idle, self._probes, self._spec = [], [], {}, []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    # ------------------------------------------------------------------------------------------------ training
    def train(self, ctx: RoundContext, tasks: list[ClientTask]) -> RoundOutput:
        ray, max_retries = self._ray, self.cfg.engine.max_retries
        crash = frozenset(self.cfg.engine.crash_clients)
        box = [ray.put(ctx)]  # once per round; in a list so Ray passes the reference, not a copy per task
        pending = deque((task, 0) for task in largest_first(tasks))
        running: dict = {}  # task ref -> (slot, task, attempt)
        out = RoundOutput([])
        while pending or running:
            while pending and self._idle:
                slot = self._idle.pop(0)
                task, attempt = pending.popleft()
                crashes = attempt == 0 and task.client_id in crash
                running[self._actors[slot].train.remote(self._spec, box, task, crashes)] = (slot, task, attempt)
            if not running and not self._probes:  # every actor is gone for good
                out.failures += [ClientFailure(t.client_id, "WorkerLost: no live Ray actor left") for t, _ in pending]
                break
            done, _ = ray.wait([*running, *self._probes], num_returns=1, timeout=1.0)
            if not done:
                self._expire_probes()
            elif done[0] in self._probes:
                self._finish_probe(done[0])
            else:
                slot, task, attempt = running.pop(done[0])
                reason = self._collect(done[0], slot, task, out)
                if reason is not None and attempt < max_retries:
                    self.retries += 1
                    pending.appendleft((task, attempt + 1))
                elif reason is not None:
                    out.failures.append(ClientFailure(task.client_id, reason))
        return out.in_client_order()

    def _collect(self, ref, slot: int, task: ClientTask, out: RoundOutput) -> str | None:
        """Take a finished task's result into ``out``; returns the failure reason if it failed."""
        ray = self._ray
        try:
            part: RoundOutput = ray.get(ref)
        except ray.exceptions.RayActorError as exc:  # the process died (crash, OOM kill, lost node)
            self.worker_deaths += 1
            self._probe(slot)
            return f"WorkerDied: the Ray actor running client {task.client_id} died ({first_line(exc)[:200]})"
        except ray.exceptions.RayError as exc:  # e.g. an object lost with its node; the actor may be fine
            self._probe(slot)
            return f"{type(exc).__name__}: {first_line(exc)[:200]}"
        self._idle.append(slot)
        if part.failures:
            return part.failures[0].reason
        out.results.extend(part.results)
        return None

    # ---- dead actors: Ray restarts them; a ready() probe says when one takes tasks again
    def _probe(self, slot: int, since: float | None = None) -> None:
        self._probes[self._actors[slot].ready.remote()] = (slot, since or time.monotonic())

    def _finish_probe(self, ref) -> None:
        ray = self._ray
        slot, since = self._probes.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.ActorDiedError:  # restarts exhausted or killed: gone for good
            self._dead.add(slot)
        except ray.exceptions.RayError:  # still restarting
            if time.monotonic() - since > RESTART_TIMEOUT:
                self._give_up(slot)
            else:
                time.sleep(POLL_SECONDS)
                self._probe(slot, since)
        else:
            self._idle.append(slot)
            self._idle.sort()

    def _settle_probes(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._probes and time.monotonic() < deadline:
            done, _ = self._ray.wait(list(self._probes), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if done:
                self._finish_probe(done[0])

    def _expire_probes(self) -> None:
        for ref, (slot, since) in list(self._probes.items()):
            if time.monotonic() - since > RESTART_TIMEOUT:
                del self._probes[ref]
                self._give_up(slot)

    def _give_up(self, slot: int) -> None:
        self._dead.add(slot)
        ray_actor.kill_all(self._ray, [self._actors[slot]])

    # ------------------------------------------------------------------------------------------------ evaluation
    def evaluate_test(self, state: State, *, train_mode: bool = False) -> EvalResult:
        """The test set split over the idle actors in slices aligned to eval.batch_size (so every batch, and with
        ``train_mode`` its BatchNorm statistics, is the one a single process would see); a slice whose actor
        fails is evaluated here instead."""
        ray = self._ray
        slots = list(self._idle)
        bounds = slice_bounds(len(self.data.test_y), len(slots), self.cfg.eval.batch_size) if len(slots) > 1 else []
        if len(bounds) < 3:  # fewer than two slices (or idle actors): here
            return super().evaluate_test(state, train_mode=train_mode)
        box = [ray.put(state)]
        calls = [(self._actors[s].evaluate_test_rows.remote(self._spec, box, a, b, train_mode), s, a, b)
                 for s, a, b in zip(slots, bounds[:-1], bounds[1:], strict=False)]
        parts = []
        for ref, slot, a, b in calls:
            try:
                parts.append(ray.get(ref))
            except ray.exceptions.RayError as exc:
                if isinstance(exc, ray.exceptions.RayActorError):
                    self.worker_deaths += 1
                    self._idle.remove(slot)
                    self._probe(slot)
                parts.append(self.local.evaluate_test_rows(state, a, b, train_mode=train_mode))
        return EvalResult.merge(parts)


ENGINE_FORMS = "local, auto, host:port or ray://host:port"


def _host_port(address: str) -> tuple[str, int] | None:
    return host_port(address, "engine.address", ENGINE_FORMS)


def _check_reachable(address: str) -> None:
    check_reachable(_host_port(address), address, "engine.address", "engine.address=local")
