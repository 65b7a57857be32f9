"""Config hashes: which keys can change a run's numbers (``results_hash``: the doctor's and sweeps' run cache) and
which may change when a run is resumed (``config_hash`` with exclusions)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fedgap.config.load import config_to_dict
from fedgap.config.schema import Config

# Keys that change how fast a run goes or what it additionally measures, never its numbers.
RESULT_NEUTRAL: tuple[tuple[str, ...], ...] = (("engine",), ("checkpoint",), ("eval", "diagnostics"), ("track",))
# Keys added after runs were cached: left out of the hashes while they hold their default (off), so that adding
# an optional feature keeps every earlier run's cache entry and checkpoint valid.
LATER_KEYS: dict[tuple[str, ...], Any] = {("server", "average"): None, ("model", "bn_momentum"): None,
                                         ("model", "bn_eps"): None, ("data", "labels_per_client"): 2}


def config_hash(cfg: Config, exclude: tuple[tuple[str, ...], ...] = ()) -> str:
    tree = config_to_dict(cfg)
    for path, default in LATER_KEYS.items():
        if _get(tree, path) == default:
            exclude = (*exclude, path)
    for path in exclude:
        node = tree
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def results_hash(cfg: Config) -> str:
    """Hash of everything that can change a run's numbers: caches doctor and sweep runs."""
    return config_hash(cfg, RESULT_NEUTRAL)[:12]

