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
