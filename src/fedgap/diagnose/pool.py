"""Run many experiments at once, cached by config hash: what the doctor and sweeps are built on.

Each run lives in ``ROOT/runs/<name>-<results hash>/`` with its usual files. A run whose ``summary.json``
exists is reused, not rerun; a run with a checkpoint is resumed; so an interrupted doctor or sweep started
again finishes without redoing finished work, and a second call with the same settings costs nothing.

Runs go to ``jobs`` worker processes with ``threads`` intra-op threads each (on a 2-core machine two 1-thread
processes train faster than one 2-thread process). Workers die with the parent (``PR_SET_PDEATHSIG``), and
every run folder is locked while it is written, so a killed doctor leaves no orphan writing behind it.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgap.config import RESULT_NEUTRAL, Config, config_from_dict, config_hash, config_to_dict, read_yaml, results_hash
from fedgap.errors import FedgapError
from fedgap.experiment import outputs
from fedgap.progress import console, make_progress
from fedgap.runtime import die_with_parent
from fedgap.track.command import track_cached

RUNS = "runs"


@dataclass
class RunSpec:
    name: str  # short, file-name safe: "fedprox-s0"
    cfg: Config
    diagnostics: bool = False

    @property
    def key(self) -> str:
        return results_hash(self.cfg)


@dataclass
class RunRecord:
    spec: RunSpec
    run_dir: Path
    summary: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    cached: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.summary is not None


def run_dir_for(root: Path, spec: RunSpec) -> Path:
    """The folder of a run: an existing one with the same hash is reused whatever its name."""
    base = root / RUNS
    found = sorted(base.glob(f"*-{spec.key}")) if base.exists() else []
    return found[0] if found else base / f"{spec.name}-{spec.key}"


def extension_key(cfg: Config) -> str | None:
    """What a run shares with the same run cut at fewer rounds (all but server.rounds and eval.every); None when
    a shorter run is not a prefix of a longer one (a cosine server lr schedule depends on server.rounds)."""
    if cfg.server.lr_schedule != "constant":
        return None
    return config_hash(cfg, RESULT_NEUTRAL + (("server", "rounds"), ("eval", "every")))[:12]


def finished_prefixes(root: Path) -> list[tuple[str, int, Path]]:
    """(extension key, rounds completed, folder) of every finished, non-diverged run under ``root``: read once
    per ``run_all`` call, not once per spec."""
    base = root / RUNS
    out = []
    for other in base.iterdir() if base.exists() else ():
        ckpt, cfg_file, summary_file = other / outputs.CHECKPOINT, other / outputs.CONFIG, other / outputs.SUMMARY
        if not (ckpt.exists() and cfg_file.exists() and summary_file.exists()):
            continue
        try:
            key = extension_key(config_from_dict(read_yaml(cfg_file)))
        except FedgapError:
            continue
        summary = json.loads(summary_file.read_text())
        if key is not None and not summary.get("diverged_at_round"):
            out.append((key, int(summary.get("rounds_completed") or 0), other))
    return out


def start_from_shorter(prefixes: list[tuple[str, int, Path]], spec: RunSpec, run_dir: Path) -> int:
    """Successive halving extends runs instead of repeating them: if a run of the same config with fewer
    rounds exists (``prefixes``), copy its checkpoint and metrics into ``run_dir`` so the run resumes from there
    (a resumed run ends exactly as an uninterrupted one, tests/test_run.py). Returns the rounds it starts from."""
    key = extension_key(spec.cfg)
    if key is None or run_dir.exists():
        return 0
    shorter = [(done, other) for k, done, other in prefixes if k == key and 0 < done < spec.cfg.server.rounds]
    if not shorter:
        return 0
    best_rounds, best = max(shorter, key=lambda item: item[0])
    run_dir.mkdir(parents=True)
    for name in (outputs.CONFIG, outputs.METRICS, outputs.CHECKPOINT):
        shutil.copy2(best / name, run_dir / name)
    return best_rounds


def load_record(spec: RunSpec, run_dir: Path) -> RunRecord | None:
    """The finished run in run_dir, or None."""
    summary_path = run_dir / outputs.SUMMARY
    if not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    rows = [_parse_row(r) for r in outputs.read_metrics(run_dir / outputs.METRICS)]
    return RunRecord(spec, run_dir, summary, rows, cached=True)


def _parse_row(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if v == "":
            out[k] = None
            continue
        try:
            out[k] = int(v) if v.lstrip("-").isdigit() else float(v)
        except ValueError:
            out[k] = v
    return out


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


class _Reporter:
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


def run_all(specs: Sequence[RunSpec], root: Path, *, jobs: int | None = None, title: str = "runs",
            show_progress: bool = True, on_done: Callable[[RunRecord], None] | None = None) -> list[RunRecord]:
    """Run every spec (reusing finished runs) and return one record per spec, in order. A run that fails is
    a record with ``error`` set; the others go on."""
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
        jobs = min(jobs or default_jobs(specs[0].cfg), len(todo))
        threads = max(1, (os.cpu_count() or 1) // jobs)
        display = _Display(title, len(specs), len(specs) - len(todo), show_progress)
        try:
            if jobs == 1:
                _run_here(todo, records, threads, display, on_done)
            else:
                _run_in_pool(todo, records, jobs, threads, display, on_done)
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


def _run_here(todo, records, threads, display, on_done) -> None:
    q: queue_mod.Queue = queue_mod.Queue()
    display.follow(q)
    for i, spec, run_dir in todo:
        error = None
        try:
            execute(spec.name, config_to_dict(spec.cfg), str(run_dir), spec.diagnostics, threads, progress_queue=q)
        except FedgapError as exc:
            error = str(exc)
        records[i] = _finish(spec, run_dir, error)
        display.done(records[i])
        if on_done:
            on_done(records[i])


def _run_in_pool(todo, records, jobs, threads, display, on_done) -> None:
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
                records[i] = _finish(spec, run_dir, error)
                display.done(records[i])
                if on_done:
                    on_done(records[i])
    except BaseException:
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()  # a run in a killed worker resumes from its last checkpoint next time
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


class _Display:
    """An overall bar plus one bar per running run on a terminal; a plain line per finished run otherwise."""

    def __init__(self, title: str, total: int, done: int, enabled: bool):
        self.enabled = enabled
        self.total, self.count = total, done
        self.progress = make_progress() if enabled and console.is_terminal else None
        self.tasks: dict[str, Any] = {}
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if self.progress is not None:
            self.progress.start()
            self.overall = self.progress.add_task(title, total=total, completed=done, status="runs")

    def follow(self, q) -> None:
        # Always drain, even with no display: undelivered messages fill the pipe (64 KB, a few hundred rounds),
        # and a worker whose queue feeder is blocked never exits, so the pool's shutdown would wait forever.
        self.thread = threading.Thread(target=self._drain, args=(q,), daemon=True)
        self.thread.start()

    def _drain(self, q) -> None:
        while not self.stop.is_set():
            try:
                name, round_, total, acc = q.get(timeout=0.2)
            except queue_mod.Empty:
                continue
            except (EOFError, OSError):
                return
            if self.progress is None:
                continue
            if name not in self.tasks:
                self.tasks[name] = self.progress.add_task(name, total=total, status="")
            self.progress.update(self.tasks[name], completed=round_,
                                 status=f"acc {acc:.2%}" if acc is not None else "")

    def done(self, record: RunRecord) -> None:
        self.count += 1
        if not self.enabled:
            return
        what = (f"failed: {record.error}" if record.error else
                f"{(record.summary or {}).get('final_test_accuracy') or 0:.2%}")
        if self.progress is not None:
            self.progress.update(self.overall, completed=self.count)
            task = self.tasks.pop(record.spec.name, None)
            if task is not None:
                self.progress.remove_task(task)
            self.progress.console.print(f"  {record.spec.name}: {what}", highlight=False)
        else:
            print(f"[{self.count}/{self.total}] {record.spec.name}: {what}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=1)
        if self.progress is not None:
            self.progress.stop()
