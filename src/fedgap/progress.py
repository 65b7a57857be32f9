"""Progress display for long work: a rich progress bar on a terminal, sparse plain lines otherwise (logs, CI).

``RunProgress`` is what the round loop talks to; the doctor and sweeps hand several runs one shared rich
``Progress`` so their bars stack instead of fighting over the terminal.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class RunProgress:
    """Rounds of one run. ``progress`` may be shared; when None and the console is a terminal a private one is
    created. Off a terminal, a plain line is printed about every 10% of rounds (and at least every minute)."""

    def __init__(self, label: str, total: int, done: int = 0, progress: Progress | None = None,
                 enabled: bool = True):
        self.label, self.total, self.enabled = label, total, enabled
        self.own = progress is None and enabled and console.is_terminal
        self.progress = make_progress() if self.own else progress
        self.task = None
        self.last_line = time.monotonic()
        self.step = max(1, total // 10)
        if self.progress is not None and enabled:
            if self.own:
                self.progress.start()
            self.task = self.progress.add_task(label, total=total, completed=done, status="")

    def update(self, round_: int, status: str) -> None:
        if not self.enabled:
            return
        if self.task is not None:
            self.progress.update(self.task, completed=round_, status=status)
        elif round_ % self.step == 0 or round_ == self.total or time.monotonic() - self.last_line > 60:
            print(f"{self.label}: round {round_}/{self.total} {status}", file=sys.stderr, flush=True)
            self.last_line = time.monotonic()

    def close(self) -> None:
        if self.task is not None and not self.own:
            self.progress.remove_task(self.task)
        if self.own and self.progress is not None:
            self.progress.stop()
        self.task = None
