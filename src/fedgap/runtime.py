"""Process-level tuning that every engine applies once per process.

glibc's allocator hands blocks above a (dynamic, at most 32 MB) threshold to mmap and gives freed heap tops
back to the kernel (trim). A CNN forward pass allocates and frees the same large activation buffers every
batch, so each batch pays for fresh zero-filled pages: measured here, evaluating the 10k MNIST test images
with mobilenet-like took 1.0-1.5 s that way and 0.4-0.5 s with both thresholds raised. Raising them keeps
the freed buffers in the heap for reuse; the cost is that the process keeps its peak heap (tens of MB here).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import signal
import sys
import threading

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # Ctrl-C, and kill's default (the loop raises on both)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_PR_SET_PDEATHSIG = 1
_done = False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library on Linux (None elsewhere, or where it cannot be loaded)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def tune_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Raise glibc's mmap and trim thresholds (once per process). Returns True when applied."""
    global _done
    if _done:
        return True
    libc = _libc()
    try:
        ok = libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    except AttributeError:  # not glibc (musl, ...): nothing to tune
        return False
    _done = ok
    return ok


def trim_heap() -> bool:
    """Give the heap's free pages back to the kernel (glibc ``malloc_trim``). Called before forking workers:
    a child that reuses a free chunk of the inherited heap writes to a copy-on-write page and so duplicates
    it (measured: about 50 MB per round of the parallel engine's total memory); trimmed, the child allocates
    fresh pages of its own instead. Returns True when glibc did it."""
    libc = _libc()
    try:
        libc.malloc_trim(0)
    except AttributeError:  # no libc, or not glibc
        return False
    return True


def die_with_parent(parent_pid: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux, PR_SET_PDEATHSIG): a worker must not
    outlive a parent that was killed and could run no cleanup. With ``parent_pid``, exit at once if the parent
    already died before the request took effect."""
    libc = _libc()
    try:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except AttributeError:
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


@contextlib.contextmanager
def stop_signals_deferred():
    """Hold Ctrl-C and SIGTERM back while forking a worker; they are raised right after, in ordinary code.

    CPython runs ``os.register_at_fork`` callbacks (logging registers one) after ``fork()`` in the parent, and a
    KeyboardInterrupt raised inside such a callback is printed as "Exception ignored" and dropped: a Ctrl-C that
    landed in a fork was lost and the run went on (seen: 1 to 2 in 30 interrupts sent as a worker started). A
    signal mask would not do (any of torch's threads may take a process-directed signal), so the signals get a
    handler that only records them for the length of the block; then the previous handlers come back and each
    recorded signal is raised again. Main thread only (where Python runs signal handlers); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda sig, _frame: caught.append(sig)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)
