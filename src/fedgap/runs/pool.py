"""Run many experiments at once, cached by config hash: what the doctor and sweeps are built on.

Each run lives in the run cache (``fedgap.runs.cache``): a finished run is reused, not rerun, an unfinished
one resumed, so an interrupted doctor or sweep started again finishes without redoing finished work, and a
second call with the same settings costs nothing.

Runs go to ``jobs`` worker processes with ``threads`` intra-op threads each (on a 2-core machine two 1-thread
processes train faster than one 2-thread process). The threads per run are fixed by the caller (default: cores //
jobs), never by how many runs are left in a batch: a float32 result depends on the threads that computed it (the
order of parallel sums), so the same run gives the same numbers whether it ran in a full batch, alone at the end
of one, or resumed after an interruption. Workers die with the parent (``PR_SET_PDEATHSIG``), and
every run folder is locked while it is written, so a killed doctor leaves no orphan writing behind it.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue as queue_mod
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from fedgap.callbacks import RoundCallback
from fedgap.config import Config, config_from_dict, config_to_dict
from fedgap.errors import FedgapError
from fedgap.experiment import outputs
from fedgap.runs.cache import finished_prefixes, run_dir_for, start_from_shorter
from fedgap.runs.display import Display
from fedgap.runs.records import RunRecord, RunSpec, load_record
from fedgap.runtime import die_with_parent
from fedgap.track.command import track_cached

# ------------------------------------------------------------------------------------------------- workers
_progress_queue: Any = None


def _init_worker(progress_queue, threads: int) -> None:
    global _progress_queue
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    _progress_queue = progress_queue
    if progress_queue is not None:
        progress_queue.cancel_join_thread()  # progress is expendable: never let it keep a finished worker alive
    import torch

    torch.set_num_threads(threads)


class _Reporter(RoundCallback):
    """Round callback sending (name, round, total, accuracy) to the parent's progress display."""

    def __init__(self, q, name: str, total: int):
        self.q, self.name, self.total = q, name, total

    def on_round_end(self, info) -> dict[str, Any]:
        if self.q is not None:
            try:
                self.q.put_nowait((self.name, info.round, self.total, info.row.get("test_accuracy")))
            except Exception:  # a full or closed queue must never break a run
                pass
        return {}


def execute(name: str, cfg_tree: dict[str, Any], run_dir: str, diagnostics: bool, threads: int | None = None,
            progress_queue=None) -> dict[str, Any]:
    """Run (or resume) one experiment in this process; returns its summary."""
    from fedgap.experiment.loop import Experiment

    cfg = config_from_dict(cfg_tree)
    if diagnostics:
        cfg.eval.diagnostics = True
    if threads is not None:
        cfg.engine.threads = threads
    out = Path(run_dir)
    resume = (out / outputs.CHECKPOINT).exists()
    q = progress_queue if progress_queue is not None else _progress_queue
    reporter = _Reporter(q, name, cfg.server.rounds)
    if q is not None:
        q.put_nowait((name, 0, cfg.server.rounds, None))
    exp = Experiment(cfg, out, resume=resume, overwrite=not resume, callbacks=[reporter], show_progress=False,
                     label=name)
    return exp.run()


# ------------------------------------------------------------------------------------------------- the pool
def default_jobs(cfg: Config) -> int:
    """One job per core for engines that run in the calling process; one job for engines with their own
    workers (parallel, ray), which already use every core."""
    if cfg.engine.name in ("parallel", "ray"):
        return 1
    return max(1, os.cpu_count() or 1)


def default_threads(jobs: int) -> int:
    """Intra-op threads per run when ``jobs`` runs share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // jobs)


# Runs the runs still to do elsewhere (fedgap.runs.cluster): (todo: [(index, spec, run folder)], threads per run,
# finish) and calls finish(index, spec, run folder, error or None) as each run ends, its files in its folder.
Backend = Callable[[list[tuple[int, RunSpec, Path]], int, Callable[[int, RunSpec, Path, str | None], RunRecord]],
                   None]


def run_all(specs: Sequence[RunSpec], root: Path, *, jobs: int | None = None, threads: int | None = None,
            title: str = "runs", show_progress: bool = True,
            on_done: Callable[[RunRecord], None] | None = None, backend: Backend | None = None) -> list[RunRecord]:
    """Run every spec (reusing finished runs) and return one record per spec, in order. A run that fails is
    a record with ``error`` set; the others go on. ``backend``: where the runs still to do run (default: this
    machine's processes)."""
    root.mkdir(parents=True, exist_ok=True)
    records: dict[int, RunRecord] = {}
    todo: list[tuple[int, RunSpec, Path]] = []
    first: dict[str, int] = {}  # specs with one config hash run once (a grid point equal to the naive run)
    prefixes: list | None = None
    aliases: dict[int, int] = {}
    for i, spec in enumerate(specs):
        if spec.key in first:
            aliases[i] = first[spec.key]
            continue
        first[spec.key] = i
        run_dir = run_dir_for(root, spec)
        done = load_record(spec, run_dir)
        if done is not None:
            records[i] = done
            track_cached(done)  # track.mlflow: a cached run never tracked in this store is logged from its files
            if on_done:
                on_done(done)
        else:
            if prefixes is None:
                prefixes = finished_prefixes(root)
            start_from_shorter(prefixes, spec, run_dir)
            todo.append((i, spec, run_dir))
    if todo:
        jobs = jobs or default_jobs(specs[0].cfg)
        threads = threads or default_threads(jobs)  # per run, whatever is left in this batch (module docstring)
        jobs = min(jobs, len(todo))
        display = Display(title, len(specs), len(specs) - len(todo), show_progress)

        def finish(i: int, spec: RunSpec, run_dir: Path, error: str | None) -> RunRecord:
            """A run has ended (its files in ``run_dir``): its record, shown and passed on."""
            records[i] = _finish(spec, run_dir, error)
            display.done(records[i])
            if on_done:
                on_done(records[i])
            return records[i]

        try:
            if backend is not None:
                backend(todo, threads, finish)
            elif jobs == 1:
                _run_here(todo, threads, display, finish)
            else:
                _run_in_pool(todo, jobs, threads, display, finish)
        finally:
            display.close()
    for i, j in aliases.items():
        records[i] = dataclasses.replace(records[j], spec=specs[i])
    return [records[i] for i in range(len(specs))]


def _finish(spec: RunSpec, run_dir: Path, error: str | None) -> RunRecord:
    if error is None:
        record = load_record(spec, run_dir)
        if record is not None:
            record.cached = False
            return record
        error = "the run ended without a summary"
    return RunRecord(spec, run_dir, error=error)


def _run_here(todo, threads, display, finish) -> None:
    q: queue_mod.Queue = queue_mod.Queue()
    display.follow(q)
    for i, spec, run_dir in todo:
        error = None
        try:
            execute(spec.name, config_to_dict(spec.cfg), str(run_dir), spec.diagnostics, threads, progress_queue=q)
        except FedgapError as exc:
            error = str(exc)
        finish(i, spec, run_dir, error)


def _run_in_pool(todo, jobs, threads, display, finish) -> None:
    ctx = mp.get_context("spawn")  # no fork after torch's thread pools exist
    q = ctx.Queue()
    display.follow(q)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(q, threads))
    futures: dict[Future, tuple[int, RunSpec, Path]] = {}
    try:
        for i, spec, run_dir in todo:
            fut = pool.submit(execute, spec.name, config_to_dict(spec.cfg), str(run_dir), spec.diagnostics, threads)
            futures[fut] = (i, spec, run_dir)
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                i, spec, run_dir = futures[fut]
                error = None
                exc = fut.exception()
                if exc is not None:
                    error = str(exc) if isinstance(exc, FedgapError) else f"{type(exc).__name__}: {exc}"
                finish(i, spec, run_dir, error)
    except BaseException:
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()  # a run in a killed worker resumes from its last checkpoint next time
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
