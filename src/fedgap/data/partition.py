"""Partitions of a training set over clients. Each returns one sorted index array per client; together they
hold every training sample exactly once (``shards`` included: its shards cover the whole set).

- ``iid``: a random permutation cut into near-equal parts.
- ``dirichlet``: for each label, client shares drawn from Dir(alpha); small alpha = strong label skew
  (Hsu et al. 2019). Redrawn until every client holds at least ``min_samples``.
- ``shards``: the FedAvg paper's pathological split (McMahan et al. 2017): samples sorted by label, cut into
  num_clients x shards_per_client near-equal shards, dealt out at random. Shards are cut within one label (a
  plain cut of the sorted list lets a shard straddle two labels), so a client has at most shards_per_client
  labels.
- ``quantity``: client sizes skewed, labels IID (quantity skew, as in NIID-Bench, Li et al. 2022): every client
  gets ``min_samples``, the rest is shared out in proportions drawn from Dir(alpha) over clients.
- ``labels``: NIID-Bench's quantity-based label imbalance "#C=K" (Li et al., ICDE 2022; also Flower's
  ``niid_bench`` baseline): client i holds label i mod C (C labels in the training set), then K-1 more distinct
  labels drawn uniformly from the ones it does not hold yet; each label's samples are shuffled and split into
  near-equal parts among the clients that hold it. Needs at least C clients, so that every label is held (with
  fewer, NIID-Bench's split has nobody to give a label's rows to) and K <= C (K = C: every client holds every
  label, a stratified IID split, as NIID-Bench's "#C=10"). A label with fewer rows than holders leaves the
  last of them without any (as in NIID-Bench); not a case on MNIST or any set with more rows than clients per label.
- ``central``: one client holding everything (the centralized baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedgap import seeding
from fedgap.errors import ConfigError

_MAX_DRAWS = 1000


def partition(labels: np.ndarray, scheme: str, num_clients: int, *, seed: int, alpha: float = 0.5,
              shards_per_client: int = 2, min_samples: int = 0, labels_per_client: int = 2) -> list[np.ndarray]:
    labels = np.asarray(labels)
    n = len(labels)
    if scheme == "central":
        return [np.arange(n)]
    if num_clients > n:
        raise ConfigError(f"data.num_clients: {num_clients} is more than the {n} training samples")
    rng = seeding.rng(seed, seeding.PARTITION)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "dirichlet":
        parts = _redraw(lambda: _dirichlet(labels, num_clients, alpha, rng), min_samples, "data.alpha")
    elif scheme == "quantity":
        parts = _quantity(n, num_clients, alpha, min_samples, rng)
    elif scheme == "shards":
        parts = _shards(labels, num_clients, shards_per_client, rng)
    elif scheme == "labels":
        parts = _labels(labels, num_clients, labels_per_client, rng)
    else:
        raise ConfigError(f"data.partition: must be one of iid, dirichlet, shards, quantity, labels, central, "
                          f"got {scheme!r}")
    return [np.sort(p).astype(np.int64) for p in parts]


def partition_for(data_cfg, labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """The partition that a config's ``data`` section asks for (every command and the loop go through here).
    Rows held out for validation (``data.validation``) belong to no client."""
    d = data_cfg
    keep = training_rows(d, labels, seed)
    parts = partition(labels[keep], d.partition, d.num_clients, seed=seed, alpha=d.alpha,
                      shards_per_client=d.shards_per_client, min_samples=d.min_samples,
                      labels_per_client=d.labels_per_client)
    return parts if len(keep) == len(labels) else [keep[p] for p in parts]


def validation_rows(data_cfg, labels: np.ndarray, seed: int) -> np.ndarray:
    """The training-set rows held out for selection: ``data.validation`` of every class (stratified), drawn
    with the seed, before any partitioning, so no client ever trains on them. Sorted; empty if 0."""
    share = getattr(data_cfg, "validation", 0.0) or 0.0
    if share <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = seeding.rng(seed, seeding.VALIDATION)
    held = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        held.append(rng.permutation(rows)[: int(round(share * len(rows)))])
    return np.sort(np.concatenate(held)).astype(np.int64)


def training_rows(data_cfg, labels: np.ndarray, seed: int) -> np.ndarray:
    """The training-set rows the clients share: all but the validation rows."""
    return np.setdiff1d(np.arange(len(labels)), validation_rows(data_cfg, labels, seed)).astype(np.int64)


def _redraw(draw, min_samples: int, key: str) -> list[np.ndarray]:
    for _ in range(_MAX_DRAWS):
        parts = draw()
        if min(len(p) for p in parts) >= min_samples:
            return parts
    raise ConfigError(
        f"data.min_samples: no draw in {_MAX_DRAWS} gave every client {min_samples} samples; "
        f"lower data.min_samples or data.num_clients, or raise {key}"
    )


def _dirichlet(labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(k, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        for client, piece in enumerate(np.split(idx, cuts)):
            parts[client].append(piece)
    return [np.concatenate(p) for p in parts]


def _quantity(n: int, k: int, alpha: float, min_samples: int, rng: np.random.Generator) -> list[np.ndarray]:
    if k * min_samples > n:
        raise ConfigError(f"data.min_samples: {k} clients x {min_samples} samples exceeds the {n} training samples")
    shares = rng.dirichlet(np.full(k, alpha))
    sizes = min_samples + np.diff(np.round(np.cumsum(np.r_[0.0, shares]) * (n - k * min_samples))).astype(np.int64)
    return np.split(rng.permutation(n), np.cumsum(sizes)[:-1])


def _shards(labels: np.ndarray, k: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    total = k * per_client
    classes, counts = np.unique(labels, return_counts=True)
    if total < len(classes):
        raise ConfigError(
            f"data.shards_per_client: num_clients x shards_per_client = {total} shards cannot cover "
            f"{len(classes)} labels; raise either"
        )
    if total > len(labels):
        raise ConfigError(f"data.shards_per_client: {total} shards for {len(labels)} samples; lower it")
    # Shards per label proportional to label frequency (largest remainder, at least one per label).
    exact = counts / counts.sum() * total
    per_label = np.maximum(1, np.floor(exact).astype(np.int64))
    while per_label.sum() < total:
        per_label[np.argmax(exact - per_label)] += 1
    while per_label.sum() > total:
        per_label[np.argmax(per_label - exact)] -= 1
    shards: list[np.ndarray] = []
    for c, m in zip(classes, per_label, strict=True):
        shards += np.array_split(np.flatnonzero(labels == c), m)  # stable: sorted by label, then index
    order = rng.permutation(total)
    return [np.concatenate([shards[s] for s in order[i * per_client : (i + 1) * per_client]]) for i in range(k)]


def _labels(labels: np.ndarray, k: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    c = len(classes)
    if per_client > c:
        raise ConfigError(f"data.labels_per_client: {per_client} is more than the {c} labels of the training set")
    if k < c:
        raise ConfigError(f"data.num_clients: the labels partition needs at least one client per label ({c}), so "
                          f"that client i can hold label i mod {c} and every label is held; got {k}")
    # Which labels each client holds: its own label i mod C, then K-1 others, uniformly among those it lacks
    # (NIID-Bench draws with rejection until K distinct labels: the same distribution).
    held = []
    for i in range(k):
        others = np.delete(np.arange(c), i % c)
        held.append([i % c, *rng.choice(others, size=per_client - 1, replace=False).tolist()])
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for j, label in enumerate(classes):
        holders = [i for i in range(k) if j in held[i]]
        pieces = np.array_split(rng.permutation(np.flatnonzero(labels == label)), len(holders))
        for i, piece in zip(holders, pieces, strict=True):
            parts[i].append(piece)
    return [np.concatenate(p) for p in parts]


def partition_text(data_cfg) -> str:
    """The partition in a few words for titles and reports: 'dirichlet (alpha 0.1)', 'labels (#C=2)'."""
    d = data_cfg
    if d.partition in ("dirichlet", "quantity"):
        return f"{d.partition} (alpha {d.alpha})"
    if d.partition == "shards":
        return f"shards ({d.shards_per_client} shards per client)"
    if d.partition == "labels":
        return f"labels (#C={d.labels_per_client}: {d.labels_per_client} labels per client)"
    return d.partition


@dataclass
class PartitionStats:
    counts: np.ndarray  # clients x classes
    sizes: np.ndarray
    classes_per_client: np.ndarray
    tv_distance: np.ndarray  # per client: total-variation distance of its label distribution to the global one

    @property
    def mean_tv(self) -> float:
        return float(self.tv_distance.mean())

    def summary(self) -> dict[str, float]:
        return {
            "clients": int(len(self.sizes)),
            "samples_min": int(self.sizes.min()),
            "samples_median": float(np.median(self.sizes)),
            "samples_max": int(self.sizes.max()),
            "classes_per_client_mean": float(self.classes_per_client.mean()),
            "classes_per_client_min": int(self.classes_per_client.min()),
            "classes_per_client_max": int(self.classes_per_client.max()),
            "mean_tv_distance": self.mean_tv,
        }


def partition_stats(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> PartitionStats:
    labels = np.asarray(labels)
    counts = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
    sizes = counts.sum(axis=1)
    global_dist = np.bincount(labels[np.concatenate(parts)], minlength=num_classes) / sum(sizes)
    local = counts / np.maximum(sizes[:, None], 1)
    tv = 0.5 * np.abs(local - global_dist[None, :]).sum(axis=1)
    return PartitionStats(counts, sizes, (counts > 0).sum(axis=1), tv)
