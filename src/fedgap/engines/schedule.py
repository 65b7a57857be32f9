"""How engines with several workers share out a round: client order, test-set slices, balanced groups."""

from __future__ import annotations

from fedgap.fl.client import ClientTask


def largest_first(tasks: list[ClientTask]) -> list[ClientTask]:
    """Largest client first (ties by client id): the longest updates start first, so none starts last and
    leaves the other workers idle (greedy longest-processing-time scheduling)."""
    return sorted(tasks, key=lambda t: (-len(t.indices), t.client_id))


def slice_bounds(n: int, pieces: int, multiple: int) -> list[int]:
    """Cut points of [0, n) into at most ``pieces`` near-equal slices, each cut at a multiple of ``multiple``
    (the evaluation batch size, so that every batch is the one a single process would see)."""
    return sorted({min(n, round(k * n / pieces / multiple) * multiple) for k in range(pieces + 1)} | {0, n})


def balanced_groups(sizes: list[int], pieces: int) -> list[tuple[int, ...]]:
    """Indices of ``sizes`` in at most ``pieces`` groups of near-equal total (greedy largest-first)."""
    loads = [[0, []] for _ in range(min(pieces, len(sizes)))]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(loads, key=lambda entry: entry[0])
        target[0] += sizes[i]
        target[1].append(i)
    return [tuple(sorted(entry[1])) for entry in loads if entry[1]]
