"""The progress display of a batch of runs: an overall bar plus one bar per running run on a terminal, a plain
line per finished run otherwise."""

from __future__ import annotations

import queue as queue_mod
import sys
import threading
from typing import Any

from fedgap.progress import console, make_progress
from fedgap.runs.records import RunRecord


class Display:
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
