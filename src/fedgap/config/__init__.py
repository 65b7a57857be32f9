"""Typed experiment configuration: defaults in code, an optional YAML file, dotted ``key=value`` overrides.

``load_config(path, overrides)`` is the one entry point. It returns a fully resolved ``Config``: preset
defaults (``server.algorithm`` decides the client objective, the server optimizer and the norm policy unless
they are given) are filled in, so the ``config.yaml`` written with a run repeats it exactly when fed back.
Every validation failure becomes a one-line ``ConfigError`` naming the key and what is allowed.

The parts: ``schema`` (the sections and their keys), ``resolve`` (cross-key rules), ``load`` (YAML, overrides,
plain forms), ``hashing`` (run-cache and resume hashes), ``keys`` (the key reference).
"""

from fedgap.config.hashing import LATER_KEYS, RESULT_NEUTRAL, config_hash, results_hash
from fedgap.config.keys import describe_keys, keys_markdown
from fedgap.config.load import (
    config_from_dict,
    config_to_dict,
    dump_yaml,
    format_validation_error,
    load_config,
    merge,
    parse_overrides,
    read_yaml,
)
from fedgap.config.schema import (
    CheckpointConfig,
    ClientConfig,
    Config,
    DataConfig,
    EngineConfig,
    EvalConfig,
    ModelConfig,
    ObjectiveConfig,
    ServerConfig,
    TrackConfig,
)

__all__ = [
    "LATER_KEYS", "RESULT_NEUTRAL", "CheckpointConfig", "ClientConfig", "Config", "DataConfig", "EngineConfig",
    "EvalConfig", "ModelConfig", "ObjectiveConfig", "ServerConfig", "TrackConfig", "config_from_dict",
    "config_hash", "config_to_dict", "describe_keys", "dump_yaml", "format_validation_error", "keys_markdown",
    "load_config", "merge", "parse_overrides", "read_yaml", "results_hash",
]
