"""The worker process of the parallel engine: one ClientRunner, one intra-op thread, a loop over messages.

A worker is started once per run and lives until the engine closes it or its parent dies. It receives the
round's global state once ("round") and then client tasks one at a time ("task"), replying with one result or
failure per task, so a worker that dies loses only the client it was running. It also evaluates slices of the
test set ("eval") and computes BatchNorm-recalibration moments for lists of clients ("moments").

Lifetime rules, so that no worker outlives its run:
- SIGINT is ignored (Ctrl-C reaches the whole process group; the parent decides, and reaps the workers in
  ``close()``), SIGTERM keeps its default (dies), the parent's handlers are not inherited;
- on Linux the kernel sends SIGKILL when the parent dies (PR_SET_PDEATHSIG), even if the parent was killed
  with SIGKILL and could run no cleanup;
- end of file on the pipe (the parent closed it or died) ends the loop.
"""

from __future__ import annotations

import os
import signal
import stat
from multiprocessing.connection import Connection

import torch

from fedgap.engines import wire
from fedgap.engines.results import failure_from_exception
from fedgap.engines.runner import ClientRunner
from fedgap.fl.client import local_update
from fedgap.runtime import die_with_parent, tune_allocator


def _close_inherited_fds(keep: int, known: list[Connection]) -> None:
    """A forked worker inherits every descriptor of the parent: the other workers' pipe ends (sockets; holding
    them would hide their end of file) and files such as the run folder's lock (holding it would keep the folder
    locked after the parent died). Sockets and regular files are closed; FIFOs stay (multiprocessing's own
    liveness pipes: closing ours would tell the parent this worker died), and so does anything else a library
    may hold (event fds and the like)."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: at least the pipe ends we know of
        fds = [c.fileno() for c in known]
    for fd in fds:
        if fd <= 2 or fd == keep:
            continue
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISSOCK(mode) or stat.S_ISREG(mode):
                os.close(fd)
        except OSError:  # the descriptor of the listing itself, already closed
            pass


def worker_main(conn: Connection, cfg, data, hp, parent_pid: int | None, close: list[Connection]) -> None:
    """Entry point of a worker process (multiprocessing target). ``close``: the parent's pipe ends a forked
    worker inherited (empty for spawn and forkserver workers, which inherit nothing)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent_pid)  # for forkserver workers the parent is the fork server, which exits with the run
    if close:  # forked: drop what was inherited
        _close_inherited_fds(conn.fileno(), close)
    torch.set_num_threads(1)
    tune_allocator()
    try:
        runner = ClientRunner(cfg, data, hp)
    except Exception as exc:  # reported to the parent, which fails with one line
        conn.send_bytes(wire.dumps(("error", failure_from_exception(-1, exc).reason)))
        return
    conn.send_bytes(wire.dumps(("ready", os.getpid())))
    serve(conn, runner)


def serve(conn: Connection, runner: ClientRunner) -> None:
    ctx = None
    while True:
        try:
            op, arg = wire.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if op == "stop":
            return
        if op == "round":
            ctx = arg
            continue
        if op == "task":
            try:
                reply = ("result", local_update(runner.model, runner.train_x, runner.train_y, ctx, arg, runner.hp))
            except Exception as exc:  # the client is dropped from the round, the worker goes on
                reply = ("failure", failure_from_exception(arg.client_id, exc))
        else:
            try:
                reply = _side_job(runner, op, arg)
            except Exception as exc:  # the parent redoes the job in its own process, where the error surfaces
                reply = ("error", failure_from_exception(-1, exc).reason)
        try:
            conn.send_bytes(wire.dumps(reply))
        except (BrokenPipeError, OSError):
            return


def _side_job(runner: ClientRunner, op: str, arg):
    if op == "eval":
        state, start, stop, train_mode = arg
        return "eval", runner.evaluate_test_rows(state, start, stop, train_mode=train_mode)
    if op == "moments":
        state, layer, parts = arg
        return "moments", runner.layer_moments(state, layer, parts)
    raise ValueError(f"unknown message {op!r}")
