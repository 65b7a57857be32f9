import pytest
import yaml

from fedgap.config import Config, describe_keys, dump_yaml, load_config, parse_overrides
from fedgap.errors import ConfigError


def test_defaults_are_the_default_experiment():
    cfg = load_config()
    assert (cfg.data.name, cfg.data.partition, cfg.data.alpha, cfg.data.num_clients) == ("mnist", "dirichlet", 0.1, 100)
    assert (cfg.model.name, cfg.model.norm) == ("mobilenet-like", "batch")
    assert (cfg.client.optimizer, cfg.client.lr, cfg.client.momentum, cfg.client.batch_size) == ("sgd", 0.05, 0.9, 32)
    assert (cfg.server.algorithm, cfg.server.clients_per_round) == ("fedavg", 10)


def test_presets_resolve_components_and_explicit_values_win():
    cfg = load_config(overrides=["server.algorithm=fedprox"])
    assert (cfg.client.objective, cfg.server.optimizer, cfg.model.norm_policy) == ("prox", "sgd", "average")
    assert cfg.server.lr == 1.0
    cfg = load_config(overrides=["server.algorithm=fedprox", "server.optimizer=adam"])
    assert (cfg.client.objective, cfg.server.optimizer, cfg.server.lr) == ("prox", "adam", 0.01)
    assert load_config(overrides=["server.algorithm=fedbn"]).model.norm_policy == "local"
    assert load_config(overrides=["server.algorithm=fedavgm"]).server.momentum == 0.9


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  rounds: 7\nclient:\n  lr: 0.1\n")
    cfg = load_config(path, ["client.lr=0.2", "data.partition=iid"])
    assert (cfg.server.rounds, cfg.client.lr, cfg.data.partition) == (7, 0.2, "iid")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["server.algorithm=fedadam", "model.norm=group", "engine.fail_clients=[1,2]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_config(path)
    assert again == cfg


def test_central_partition_means_one_client_full_participation():
    cfg = load_config(overrides=["data.partition=central"])
    assert (cfg.data.num_clients, cfg.server.clients_per_round) == (1, 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["client.lrr=0.1"], "unknown config key 'client.lrr'; allowed here: optimizer, lr,"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["data.partition=noniid"], "data.partition: must be one of 'iid', 'dirichlet', 'shards', 'quantity'"),
        (["client.lr=0"], "client.lr: input should be greater than 0, got 0"),
        (["client.lr=-1"], "client.lr: input should be greater than 0, got -1"),
        (["server.clients_per_round=200"], "server.clients_per_round: must be <= data.num_clients (100), got 200"),
        (["model.norm=group", "model.groups=5"], "model.groups: 5 does not divide the channel counts [32, 64, 128]"),
        (["client.epochs=two"], "client.epochs: input should be a valid integer"),
        (["server.rounds"], "override 'server.rounds': expected key=value"),
        (["data.name=idx"], "data.root: required when data.name=idx"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*missing.yaml': not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)


def test_overrides_parse_yaml_scalars():
    tree = parse_overrides(["a.b=1", "a.c=0.5", "d=true", "e=[1, 2]", "f=text"])
    assert tree == {"a": {"b": 1, "c": 0.5}, "d": True, "e": [1, 2], "f": "text"}


def test_every_key_is_described():
    keys = [k for k, _, _ in describe_keys()]
    for key in ("seed", "data.partition", "model.norm_policy", "client.weight_decay", "server.mu", "engine.name"):
        assert key in keys
    assert len(keys) == len(set(keys))
    # and every described key is settable
    tree = yaml.safe_load(dump_yaml(Config()))
    assert set(tree) >= {"data", "model", "client", "server", "eval", "engine"}


def test_docs_config_md_is_generated_from_the_code():
    from conftest import REPO
    from fedgap.config import keys_markdown

    assert (REPO / "docs" / "config.md").read_text() == keys_markdown(), "run: fedgap keys --markdown > docs/config.md"
