import numpy as np
import pytest

from fedgap.data.partition import partition, partition_stats
from fedgap.errors import ConfigError

SCHEMES = ["iid", "dirichlet", "shards", "quantity", "central"]


@pytest.fixture(scope="module")
def labels(mnist):
    return mnist.train_y.numpy()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num_clients", [7, 100])
def test_every_sample_in_exactly_one_client(labels, scheme, num_clients):
    parts = partition(labels, scheme, num_clients, seed=3, alpha=0.3, min_samples=5)
    assert len(parts) == (1 if scheme == "central" else num_clients)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels)
    assert (np.sort(joined) == np.arange(len(labels))).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_seeded(labels, scheme):
    a = partition(labels, scheme, 50, seed=1, alpha=0.5)
    b = partition(labels, scheme, 50, seed=1, alpha=0.5)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    if scheme != "central":
        c = partition(labels, scheme, 50, seed=2, alpha=0.5)
        assert any(len(x) != len(y) or (x != y).any() for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("per_client", [1, 2, 3])
def test_shards_give_at_most_shards_per_client_labels(labels, per_client):
    parts = partition(labels, "shards", 100, seed=0, shards_per_client=per_client)
    stats = partition_stats(parts, labels, 10)
    assert stats.classes_per_client.max() <= per_client
    # the FedAvg paper's split: 100 clients x 2 shards of ~300
    if per_client == 2:
        assert 580 <= stats.sizes.min() and stats.sizes.max() <= 620


def test_min_samples_and_skew(labels):
    parts = partition(labels, "dirichlet", 100, seed=0, alpha=0.1, min_samples=20)
    stats = partition_stats(parts, labels, 10)
    assert stats.sizes.min() >= 20
    iid = partition_stats(partition(labels, "iid", 100, seed=0), labels, 10)
    assert iid.mean_tv < 0.1 < 0.5 < stats.mean_tv  # alpha=0.1 is strongly skewed, iid is not
    q = partition_stats(partition(labels, "quantity", 100, seed=0, alpha=0.5, min_samples=10), labels, 10)
    assert q.sizes.min() >= 10 and q.sizes.max() > 5 * np.median(q.sizes) / 2
    assert q.mean_tv < 0.25  # labels stay close to IID


def test_impossible_min_samples_is_a_config_error(labels):
    with pytest.raises(ConfigError, match="data.min_samples"):
        partition(labels, "quantity", 100, seed=0, min_samples=1000)


def test_stats_of_disjoint_clients():
    labels = np.array([0, 0, 1, 1])
    stats = partition_stats([np.array([0, 1]), np.array([2, 3])], labels, 2)
    assert stats.tv_distance.tolist() == [0.5, 0.5]
    assert stats.classes_per_client.tolist() == [1, 1]


def test_partition_command_prints_stats_and_saves_heatmap(tmp_path, capsys):
    import json

    from conftest import cli

    png = tmp_path / "heat.png"
    code, out, _ = cli("partition", "data.partition=shards", "--plot", str(png), capsys=capsys)
    assert code == 0 and "labels per client" in out and "total-variation" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = cli("partition", "data.partition=iid", "data.num_clients=10", "--json", capsys=capsys)
    stats = json.loads(out)
    assert stats["clients"] == 10 and stats["samples_min"] == 6000 and stats["classes_per_client_min"] == 10


# ---- labels: NIID-Bench's #C=K


@pytest.mark.parametrize(("num_clients", "k"), [(10, 1), (10, 2), (10, 3), (25, 3), (10, 10)])
def test_labels_each_client_holds_exactly_k_labels_split_evenly(labels, num_clients, k):
    parts = partition(labels, "labels", num_clients, seed=5, labels_per_client=k)
    joined = np.sort(np.concatenate(parts))
    assert (joined == np.arange(len(labels))).all()  # every training row assigned once
    counts = partition_stats(parts, labels, 10).counts  # clients x labels
    assert ((counts > 0).sum(axis=1) == k).all()
    assert all(counts[i, i % 10] > 0 for i in range(num_clients))  # client i holds label i mod 10
    total = np.bincount(labels, minlength=10)
    for label in range(10):
        held = counts[:, label][counts[:, label] > 0]
        assert held.sum() == total[label]
        assert held.max() - held.min() <= 1  # split evenly among the clients that hold it


def test_labels_with_k_equal_to_the_label_count_is_a_stratified_split(labels):
    parts = partition(labels, "labels", 10, seed=0, labels_per_client=10)
    counts = partition_stats(parts, labels, 10).counts
    total = np.bincount(labels, minlength=10)
    assert (counts == total // 10 + (np.arange(10)[:, None] < total % 10)).all()  # array_split: first ones +1


def test_labels_on_a_hand_made_set():
    y = np.array([2, 0, 1, 0, 2, 0, 1, 2, 0])  # label 0 at rows 1 3 5 8, 1 at 2 6, 2 at 0 4 7
    # one label per client: client i holds all of label i
    parts = partition(y, "labels", 3, seed=0, labels_per_client=1)
    assert [p.tolist() for p in parts] == [[1, 3, 5, 8], [2, 6], [0, 4, 7]]
    # every label held by all three: each label's rows shuffled, then cut 2/1/1, 1/1/0 and 1/1/1 in client order
    parts = partition(y, "labels", 3, seed=0, labels_per_client=3)
    sizes = [np.bincount(y[p], minlength=3).tolist() for p in parts]
    assert sizes == [[2, 1, 1], [1, 1, 1], [1, 0, 1]]


def test_labels_is_seeded(labels):
    a = partition(labels, "labels", 10, seed=1, labels_per_client=2)
    b = partition(labels, "labels", 10, seed=1, labels_per_client=2)
    c = partition(labels, "labels", 10, seed=2, labels_per_client=2)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert any(len(x) != len(y) or (x != y).any() for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize(("num_clients", "k", "key"), [(10, 11, "data.labels_per_client"),
                                                        (9, 2, "data.num_clients")])
def test_labels_impossible_settings_are_config_errors(labels, num_clients, k, key):
    with pytest.raises(ConfigError, match=key):
        partition(labels, "labels", num_clients, seed=0, labels_per_client=k)


def test_partition_command_shows_the_labels_split(capsys):
    import json

    from conftest import cli

    code, out, _ = cli("partition", "data.partition=labels", "data.labels_per_client=2", "data.num_clients=10",
                       "--json", capsys=capsys)
    stats = json.loads(out)
    assert code == 0 and stats["clients"] == 10
    assert stats["classes_per_client_min"] == stats["classes_per_client_max"] == 2
    code, out, err = cli("partition", "data.partition=labels", "data.labels_per_client=11", "data.num_clients=10",
                         capsys=capsys)
    assert code == 2 and "data.labels_per_client" in err and len(err.strip().splitlines()) == 1


def test_labels_per_client_is_part_of_the_results_hash_off_its_default():
    # (at its default it is left out: tests/test_averaging.py rebuilds the hash of a config without it)
    from fedgap.config import load_config, results_hash

    labels = ["data.partition=labels", "data.num_clients=10"]
    assert results_hash(load_config(overrides=[*labels, "data.labels_per_client=3"])) != \
        results_hash(load_config(overrides=labels))
