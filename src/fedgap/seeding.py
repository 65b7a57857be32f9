"""Randomness indexed by purpose, round and client, so any piece can be replayed alone.

Every random choice draws from a generator built from (seed, purpose, round, client, ...) rather than from
a global stream: the partition does not depend on how many rounds ran, a resumed run draws exactly what an
uninterrupted one would, and engines that run clients in any order or process draw the same numbers.
"""

from __future__ import annotations

import numpy as np

PARTITION, SAMPLING, CLIENT, INIT, TORCH, PERSONAL_TEST, VALIDATION = range(1, 8)


def rng(seed: int, purpose: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, *keys])


def torch_seed(seed: int, purpose: int, *keys: int) -> int:
    """A 63-bit seed for torch generators, derived the same way."""
    return int(np.random.SeedSequence([seed, purpose, *keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))
