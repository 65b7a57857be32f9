"""The parallel engine: client updates in ``engine.workers`` local processes (default: one per CPU core), each
with one intra-op thread and its own ClientRunner.

Why processes with one thread each: the client models are small, so PyTorch's intra-op parallelism splits
each small kernel over the cores and gains little; measured here, two 1-thread processes train about twice
the images per second of one 2-thread process. Evaluation of the global model and the BatchNorm
recalibration pass are split over the workers too.

How (see docs and benchmarks/README.md for the measurements behind each choice):
- Start: workers are started once per run, in ``start()``. On Linux they are forked (``engine.start_method``,
  default ``fork``): a fork inherits the data set copy-on-write (no copy, no shared-memory files) and needs no
  second ``import torch``, so the engine starts in milliseconds. Forking after the parent ran OpenMP regions
  is safe here because a worker sets one intra-op thread before any torch call, so it never enters an OpenMP
  parallel region (tests/test_engine_parallel.py forks after parallel work in the parent). ``forkserver`` and
  ``spawn`` are available (the data then cross once through torch shared memory); they pay an ``import
  torch`` (~1.1 s) per start.
- Per round the global state goes to each worker once ("round"); the tasks follow one at a time, largest
  first, each to the next idle worker (greedy longest-processing-time list scheduling, which also absorbs
  workers slowed by other load). Results come back per client and are sorted by client id, so aggregation
  sees the same order as with any other engine.
- Faults: a client that raises is a ``ClientFailure``; a worker that dies turns its running client into a
  failure and is replaced (at most ``MAX_RESTARTS`` times per run, then one-line ``FedgapError``).
  ``close()`` always reaps the workers (stop message, then SIGTERM, then SIGKILL), and the workers die with
  the parent even when it is killed (see ``fedgap.engines.worker``).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from fedgap.engines import wire
from fedgap.engines.base import ClientFailure, Engine, RoundOutput
from fedgap.engines.schedule import balanced_groups, largest_first, slice_bounds
from fedgap.engines.worker import worker_main
from fedgap.errors import ConfigError, FedgapError
from fedgap.fl.client import ClientTask, RoundContext
from fedgap.fl.evaluate import EvalResult
from fedgap.fl.normpolicy import Moments
from fedgap.fl.state import State
from fedgap.runtime import stop_signals_deferred, trim_heap, tune_allocator

MAX_RESTARTS = 3  # per run: a worker that keeps dying is a bug or a memory limit, not bad luck
START_TIMEOUT = 120.0  # seconds for a worker to report ready (spawn under heavy load is slow)
JOIN_TIMEOUT = 2.0


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_start_method(device: str = "cpu") -> str:
    """fork on Linux; spawn elsewhere, and for a CUDA device (CUDA cannot be initialized again in a forked child)."""
    return "fork" if sys.platform.startswith("linux") and device == "cpu" else "spawn"


@dataclass
class _Worker:
    index: int
    process: Any  # multiprocessing.Process
    conn: Connection
    job: Any = None  # key of the job it is running, or None when idle

    def describe(self) -> str:
        code = self.process.exitcode
        return f"worker {self.index} (pid {self.process.pid}) died" + (f" with exit code {code}" if code is not None
                                                                       else "")


@dataclass
class _Died:
    reason: str


@dataclass
class _Jobs:
    """A batch of jobs for the pool: (key, message) pairs, run in the given order on whichever worker is idle."""

    items: list[tuple[Any, bytes]]
    prelude: bytes | None = None  # sent once to every worker first (and to a replacement worker)
    replies: dict[Any, Any] = field(default_factory=dict)


class ParallelEngine(Engine):
    name = "parallel"

    def __init__(self, cfg, data, hp):
        super().__init__(cfg, data, hp)
        self.num_workers = cfg.engine.workers or available_cpus()
        self.start_method = getattr(cfg.engine, "start_method", None) or default_start_method(cfg.engine.device)
        if self.start_method == "fork" and cfg.engine.device != "cpu":
            raise ConfigError(f"engine.start_method=fork: a forked worker cannot use engine.device="
                              f"{cfg.engine.device} (CUDA is not fork-safe); use spawn or forkserver")
        self.workers: list[_Worker] = []
        self.restarts = 0

    # ------------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.workers:
            return
        tune_allocator()
        self._context = multiprocessing.get_context(self.start_method)
        if self.start_method != "fork":
            import torch.multiprocessing  # noqa: F401  registers the shared-memory reductions for tensors

            for t in (self.data.train_x, self.data.train_y, self.data.test_x, self.data.test_y):
                t.share_memory_()
            if self.start_method == "forkserver":
                self._context.set_forkserver_preload(["fedgap.engines.worker"])
        try:
            pending = [self._launch(i) for i in range(self.num_workers)]
            for worker in pending:
                self._await_ready(worker)
                self.workers.append(worker)
        except BaseException:
            for worker in pending:
                self._reap(worker)
            self.workers = []
            raise

    def close(self) -> None:
        workers, self.workers = self.workers, []
        for worker in workers:
            try:
                worker.conn.send_bytes(wire.dumps(("stop", None)))
            except (BrokenPipeError, OSError):
                pass
        for worker in workers:
            self._reap(worker)

    def _launch(self, index: int) -> _Worker:
        parent_end, child_end = self._context.Pipe(duplex=True)
        # A forked child inherits every pipe end this process holds; it closes the parent ends at once.
        inherited = [parent_end, *(w.conn for w in self.workers)] if self.start_method == "fork" else []
        process = self._context.Process(
            target=worker_main, name=f"fedgap-worker-{index}", daemon=True,
            args=(child_end, self.cfg, self.data, self.hp, None if self.start_method == "forkserver" else os.getpid(),
                  inherited))
        if self.start_method == "fork":
            trim_heap()
            gc.freeze()  # keep the collector from touching (and so copying) the parent's objects in the child
        try:
            with stop_signals_deferred():  # a Ctrl-C landing in fork() is raised after it, not lost
                process.start()
        finally:
            if self.start_method == "fork":
                gc.unfreeze()
            child_end.close()
        return _Worker(index, process, parent_end)

    def _await_ready(self, worker: _Worker) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not worker.conn.poll(0.05):
            if not worker.process.is_alive():
                raise FedgapError(f"parallel engine: {worker.describe()} while starting")
            if time.monotonic() > deadline:
                raise FedgapError(f"parallel engine: worker {worker.index} did not start in {START_TIMEOUT:.0f} s")
        try:
            kind, arg = wire.loads(worker.conn.recv_bytes())
        except (EOFError, OSError):
            raise FedgapError(f"parallel engine: {worker.describe()} while starting") from None
        if kind != "ready":
            raise FedgapError(f"parallel engine: worker {worker.index} could not start: {arg}")

    @staticmethod
    def _reap(worker: _Worker) -> None:
        process = worker.process
        process.join(JOIN_TIMEOUT)
        if process.is_alive():
            process.terminate()
            process.join(JOIN_TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join()
        worker.conn.close()

    def _replace(self, worker: _Worker, reason: str, prelude: bytes | None) -> _Worker | None:
        """A replacement for a dead worker (sent ``prelude``), or None when the restart budget is spent."""
        self._reap(worker)
        self.workers.remove(worker)
        self.restarts += 1
        if self.restarts > MAX_RESTARTS:
            return None
        new = self._launch(worker.index)
        self._await_ready(new)
        if prelude is not None:
            new.conn.send_bytes(prelude)
        self.workers.append(new)
        self.workers.sort(key=lambda w: w.index)
        return new

    # ------------------------------------------------------------------------------------------------ the pool
    def _run(self, jobs: _Jobs) -> dict[Any, Any]:
        """Run every job; the reply of each is stored by key (a ``_Died`` when its worker died running it).
        Interrupted (Ctrl-C, an error), the pool is closed: workers with half-done jobs are not reused."""
        if not self.workers:
            self.start()
        try:
            return self._dispatch(jobs)
        except BaseException:
            self.close()
            raise

    def _dispatch(self, jobs: _Jobs) -> dict[Any, Any]:
        idle = deque()
        for worker in list(self.workers):
            if jobs.prelude is None or self._send(worker, jobs.prelude):
                idle.append(worker)
            else:
                self._on_death(worker, jobs, idle, "before the round")
        queue = deque(jobs.items)
        busy: dict[Connection, _Worker] = {}
        while queue or busy:
            while queue and idle:
                worker = idle.popleft()
                key, message = queue.popleft()
                worker.job = key
                if self._send(worker, message):
                    busy[worker.conn] = worker
                else:
                    self._on_death(worker, jobs, idle, "")
            if not busy:
                if queue and not self.workers:
                    raise FedgapError("parallel engine: no worker left")
                continue
            sentinels = {w.process.sentinel: w for w in busy.values()}
            for ready in wait([*busy, *sentinels]):
                worker = busy.get(ready) or sentinels.get(ready)
                if worker is None or worker.conn not in busy:
                    continue  # already handled through its other handle in this batch
                reply = self._receive(worker)
                del busy[worker.conn]
                if reply is None:
                    self._on_death(worker, jobs, idle, "")
                else:
                    jobs.replies[worker.job] = reply
                    worker.job = None
                    idle.append(worker)
        return jobs.replies

    @staticmethod
    def _send(worker: _Worker, message: bytes) -> bool:
        try:
            worker.conn.send_bytes(message)
            return True
        except (BrokenPipeError, OSError):
            return False

    @staticmethod
    def _receive(worker: _Worker):
        """The worker's reply, or None when it died (a reply it sent before dying is still read)."""
        try:
            if not worker.conn.poll():
                worker.process.join(0.5)  # the sentinel fired: let exitcode settle
                if not worker.conn.poll():
                    return None
            return wire.loads(worker.conn.recv_bytes())
        except (EOFError, OSError):
            return None

    def _on_death(self, worker: _Worker, jobs: _Jobs, idle: deque, when: str) -> None:
        worker.process.join(0.5)
        reason = worker.describe() + (f" {when}" if when else "")
        if worker.job is not None:
            jobs.replies[worker.job] = _Died(reason)
            worker.job = None
        new = self._replace(worker, reason, jobs.prelude)
        if new is None:
            self.close()
            raise FedgapError(f"parallel engine: {reason}; {MAX_RESTARTS} workers were restarted in this run "
                              f"already, giving up (try fewer engine.workers, or engine.name=sequential)")
        idle.append(new)

    # ------------------------------------------------------------------------------------------------ engine API
    def train(self, ctx: RoundContext, tasks: list[ClientTask]) -> RoundOutput:
        order = largest_first(tasks)
        jobs = _Jobs([(t.client_id, wire.dumps(("task", t))) for t in order], prelude=wire.dumps(("round", ctx)))
        replies = self._run(jobs)
        out = RoundOutput([])
        for task in tasks:
            kind, value = ("died", replies[task.client_id]) if isinstance(replies[task.client_id], _Died) \
                else replies[task.client_id]
            if kind == "result":
                out.results.append(value)
            elif kind == "failure":
                out.failures.append(value)
            else:
                out.failures.append(ClientFailure(task.client_id, f"WorkerDied: {value.reason}"
                                                  if kind == "died" else f"WorkerError: {value}"))
        return out.in_client_order()

    def evaluate_test(self, state: State, *, train_mode: bool = False) -> EvalResult:
        """The test set cut into one slice per worker, at multiples of eval.batch_size so that every evaluation
        batch is the one the sequential engine sees (this matters with ``train_mode``: batch statistics)."""
        if not self.workers:  # not started, or closed: in this process
            return super().evaluate_test(state, train_mode=train_mode)
        bounds = slice_bounds(len(self.data.test_y), len(self.workers), self.cfg.eval.batch_size)
        spans = list(zip(bounds[:-1], bounds[1:], strict=True))
        replies = self._run(_Jobs([(span, wire.dumps(("eval", (state, *span, train_mode)))) for span in spans]))
        parts = []
        for span in spans:
            reply = replies[span]
            if isinstance(reply, _Died) or reply[0] != "eval":  # redo here: a real error surfaces in this process
                parts.append(self.local.evaluate_test_rows(state, *span, train_mode=train_mode))
            else:
                parts.append(reply[1])
        return EvalResult.merge(parts)

    def layer_moments(self, state: State, layer: str, parts: list[np.ndarray]) -> list[Moments]:
        if not self.workers:
            return super().layer_moments(state, layer, parts)
        groups = balanced_groups([len(p) for p in parts], len(self.workers))
        replies = self._run(_Jobs([(g, wire.dumps(("moments", (state, layer, [parts[i] for i in g]))))
                                   for g in groups]))
        out: list[Moments | None] = [None] * len(parts)
        for g in groups:
            reply = replies[g]
            moments = self.local.layer_moments(state, layer, [parts[i] for i in g]) \
                if isinstance(reply, _Died) or reply[0] != "moments" else reply[1]
            for i, m in zip(g, moments, strict=True):
                out[i] = m
        return out  # type: ignore[return-value]
