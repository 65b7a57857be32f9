"""Typed experiment configuration: defaults in code, an optional YAML file, dotted ``key=value`` overrides.

``load_config(path, overrides)`` is the one entry point. It returns a fully resolved ``Config``: preset
defaults (``server.algorithm`` decides the client objective, the server optimizer and the norm policy unless
they are given) are filled in, so the ``config.yaml`` written with a run repeats it exactly when fed back.
Every validation failure becomes a one-line ``ConfigError`` naming the key and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from fedgap.engines import ENGINES
from fedgap.errors import ConfigError
from fedgap.fl.normpolicy import NORM_POLICIES
from fedgap.fl.objectives import GRADIENT, LOSS, OBJECTIVES, objective_spec, with_role
from fedgap.fl.presets import PRESETS
from fedgap.fl.server import SERVER_OPTIMIZERS
from fedgap.models.registry import MODELS, is_import_path, names_text

PartitionName = Literal["iid", "dirichlet", "shards", "quantity", "labels", "central"]
NormName = Literal["batch", "group", "layer", "instance", "none"]
# The component names come from their registries (the single source): a new objective, server optimizer,
# preset or engine is a valid config value, described in `fedgap keys`, by adding its registry line.
NormPolicy = Literal[tuple(NORM_POLICIES)]
ServerOptimizer = Literal[tuple(SERVER_OPTIMIZERS)]
EngineName = Literal[tuple(ENGINES)]
Algorithm = Literal[tuple(PRESETS)]


def _names(registry) -> str:
    return " | ".join(registry)


class _Section(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default); assignments are validated;
    # every float must be finite (client.lr=inf would start a run that can only produce NaN).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    name: Literal["mnist", "idx", "npz", "folder"] = Field("mnist", description=(
        "mnist (shipped, verified) | idx (any IDX set in data.root) | npz (arrays x_train, y_train, x_test, "
        "y_test in data.path) | folder (data.root/train/CLASS/*.png, data.root/test/CLASS/*)"))
    root: str | None = Field(None, description=(
        "idx: folder with the four IDX files (default: the shipped MNIST); folder: the image folder"))
    path: str | None = Field(None, description="npz: the .npz file (made absolute)")
    partition: PartitionName = Field("dirichlet", description=(
        "iid | dirichlet | shards | quantity | labels (NIID-Bench's #C=K) | central"))
    alpha: float = Field(0.1, gt=0, description="Dirichlet concentration (dirichlet: labels, quantity: sizes)")
    num_clients: int = Field(100, ge=1, description="clients the training set is split over (central: 1)")
    shards_per_client: int = Field(2, ge=1, description="shards: label-sorted shards per client")
    labels_per_client: int = Field(2, ge=1, description=(
        "labels: distinct labels per client, K of NIID-Bench's #C=K (client i holds label i mod C and K-1 drawn)"))
    min_samples: int = Field(10, ge=0, description="minimum training samples per client (dirichlet, quantity)")
    validation: float = Field(0.0, ge=0, lt=0.5, description=(
        "share of every class of the training set held out before partitioning, for selection (val_accuracy); "
        "the doctor sets 0.1"))


class ModelConfig(_Section):
    name: str = Field("mobilenet-like", description=(
        f"{names_text(described=True)}, or your own: package.module:factory | path/to/file.py:factory "
        "(called as factory(num_classes, in_channels, image_size, **model.kwargs))"))
    kwargs: dict[str, Any] = Field(default_factory=dict, description=(
        "keyword arguments of your own factory, e.g. model.kwargs.width=64"))
    norm: NormName = Field("batch", description=(
        "norm after every conv: batch | group | layer | instance | none (your own model: its BatchNorm "
        "layers are replaced; batch keeps it as it is)"))
    norm_policy: NormPolicy | None = Field(
        None, description="average | local (FedBN) | recalibrate; default: from server.algorithm")
    groups: int = Field(8, ge=1, description="GroupNorm groups (must divide every normalized channel count)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout before the classifier")
    width: float = Field(1.0, gt=0, le=4, description="channel multiplier (mobilenet-v1/v2)")

    @field_validator("name")
    @classmethod
    def _known_or_importable(cls, name: str) -> str:
        if name in MODELS:
            return name
        if not is_import_path(name):
            raise ValueError(f"model.name: must be one of {names_text()} or package.module:factory or "
                             f"path/to/file.py:factory, got {name!r}")
        from fedgap.models import custom  # local: imports torch, and the user's code

        try:
            name = custom.absolute_target(name)
            custom.resolve(name)  # a missing module, file or function fails here, before any output is written
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return name


class ClientConfig(_Section):
    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "sgd", description="client optimizer: sgd | adam | adamw (fresh every round)")
    lr: float = Field(0.05, gt=0, description="client learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="client SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="L2 (sgd, adam) or decoupled (adamw) weight decay")
    epochs: int = Field(1, ge=1, description="local epochs per round (central: epochs per round)")
    batch_size: int = Field(32, ge=1, description="client minibatch size")
    augment: bool = Field(False, description="random shifts and rotations of client batches")
    augment_shift: int = Field(2, ge=0, le=8, description="max random shift in pixels")
    augment_rotate: float = Field(10.0, ge=0, le=45, description="max random rotation in degrees")
    objective: str | None = Field(None, description=(
        f"{_names(OBJECTIVES)}, or a loss objective ({_names(with_role(LOSS))}) + a gradient objective "
        f"({_names(with_role(GRADIENT))}), e.g. logit_adjust+scaffold; default: from server.algorithm "
        f"(objective.* holds their hyper-parameters)"))
    lr_decay: float = Field(1.0, gt=0, le=1, description=(
        "client lr schedule: round r trains at client.lr * lr_decay^(r-1) (1 = constant)"))

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, spec: str | None) -> str | None:
        try:
            return None if spec is None else objective_spec(spec)
        except ValueError as exc:
            raise ValueError(f"client.objective: {exc}") from None


class ServerConfig(_Section):
    algorithm: Algorithm = Field("fedavg", description=f"preset: {_names(PRESETS)}")
    optimizer: ServerOptimizer | None = Field(
        None, description=f"{_names(SERVER_OPTIMIZERS)}; default: from server.algorithm")
    rounds: int = Field(50, ge=1, description="federated rounds (central: epochs / client.epochs)")
    clients_per_round: int = Field(10, ge=1, description="clients sampled per round, seeded by round")
    lr: float | None = Field(None, gt=0, description="server learning rate (default: from the optimizer)")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description=(
        "server lr over rounds: constant | cosine (from server.lr at round 1 to 0 after server.rounds)"))
    momentum: float | None = Field(None, ge=0, lt=1, description="server momentum (fedavgm)")
    beta1: float = Field(0.9, ge=0, lt=1, description="first-moment decay of adam/yogi/adagrad")
    beta2: float = Field(0.99, ge=0, lt=1, description="second-moment decay of adam/yogi")
    tau: float = Field(1e-3, gt=0, description="adaptivity (epsilon) of adam/yogi/adagrad")
    mu: float = Field(0.01, ge=0, description="FedProx proximal coefficient")
    average: float | None = Field(None, ge=0, description=(
        "server-side model averaging: evaluate and hand out a polynomial-decay average of the round models "
        "(eta; 0 = all rounds equally, 3 = about the last quarter of the rounds so far; training continues "
        "from each round's own model); none = the round's model (fedgap.fl.averaging)"))
    min_clients: int = Field(1, ge=1, description="a round with fewer surviving clients stops the run")


# objective.<name>.<param>: each objective's own hyper-parameters, declared in its file (fedgap.fl.objectives).
ObjectiveConfig = create_model(
    "ObjectiveConfig", __base__=_Section, __module__=__name__,
    **{name: (cls.Params, Field(default_factory=cls.Params, description=cls.summary))
       for name, cls in OBJECTIVES.items() if cls.Params.model_fields and cls.own_section},
)


class EvalConfig(_Section):
    every: int = Field(1, ge=1, description="evaluate the global model every N rounds (and the last)")
    batch_size: int = Field(500, ge=1, description="evaluation batch size")
    target: float = Field(0.97, gt=0, le=1, description="accuracy for rounds_to_target")
    stop_at_target: bool = Field(False, description="end the run at the first evaluation reaching eval.target")
    diagnostics: bool = Field(False, description="per-round BN divergence, drift and per-client accuracy")


class EngineConfig(_Section):
    name: EngineName = Field("sequential", description="how client updates run; never changes results")
    workers: int | None = Field(None, ge=1, description="worker processes (default: CPU cores)")
    start_method: Literal["fork", "forkserver", "spawn"] | None = Field(
        None, description="parallel: how workers start (default: fork on Linux, else spawn)")
    threads: int | None = Field(None, ge=1, description="intra-op threads in the main process")
    device: str = Field("cpu", description="torch device for engines that support it (vectorized, ray)")
    cohort_size: int = Field(10, ge=1, description=(
        "vectorized: clients trained together as one batched model (more clients run in several cohorts; "
        "lower it if memory runs out)"))
    channels_last: bool = Field(True, description="NHWC memory layout (measured faster on CPU for this model family)")
    compile: bool = Field(False, description="torch.compile the client model")
    address: str = Field("local", description="ray: local | auto | ray://host:port")
    cpus_per_client: float = Field(1.0, gt=0, description="ray: CPUs reserved per client actor")
    gpus_per_client: float = Field(0.0, ge=0, description="ray: GPUs (fractions allowed) per client actor")
    max_retries: int = Field(2, ge=0, description="retries of a failed client task before it is dropped")
    fail_clients: list[int] = Field(default_factory=list, description="fault injection: these clients raise")
    crash_clients: list[int] = Field(default_factory=list, description=(
        "fault injection (ray): the actor running one of these clients' first attempt in a round exits "
        "(os._exit), so the retry runs on a healthy actor"))


class CheckpointConfig(_Section):
    every: int = Field(1, ge=1, description="write the resumable checkpoint every N rounds (and the last)")


class TrackConfig(_Section):
    tensorboard: str | None = Field(None, description=(
        "folder for TensorBoard event files (one subfolder per run); needs fedgap[tensorboard]"))
    mlflow: bool | str | None = Field(None, description=(
        "MLflow tracking URI (sqlite:///runs/mlflow.db, file:./mlruns, http://127.0.0.1:5000); true = "
        "sqlite:///mlflow.db in the current folder; needs fedgap[mlflow]"))
    experiment: str = Field("fedgap", min_length=1, description="MLflow experiment the runs are logged to")


class Config(_Section):
    seed: int = Field(0, ge=0, description="seeds the partition, sampling, init and every batch order")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    track: TrackConfig = Field(default_factory=TrackConfig)

    @model_validator(mode="after")
    def _resolve_and_check(self) -> Config:
        # model_validator(after) with validate_assignment would recurse on every assignment; use a guard.
        if getattr(self, "_resolving", False):
            return self
        object.__setattr__(self, "_resolving", True)
        try:
            _resolve(self)
        finally:
            object.__setattr__(self, "_resolving", False)
        return self


def _resolve(cfg: Config) -> None:
    """Fill preset defaults and check constraints that span several keys."""
    if cfg.data.partition == "central":
        # Centralized training is the same loop with one client holding everything, full participation.
        cfg.data.num_clients = 1
        cfg.server.clients_per_round = 1
    preset = PRESETS[cfg.server.algorithm]
    if cfg.client.objective is None:
        cfg.client.objective = preset.objective
    if cfg.server.optimizer is None:
        cfg.server.optimizer = preset.server_optimizer
    if cfg.model.norm_policy is None:
        cfg.model.norm_policy = preset.norm_policy
    if preset.normalized and cfg.client.optimizer != "sgd":  # a_i is defined for SGD steps (fedgap.fl.fednova)
        raise ValueError(f"client.optimizer: server.algorithm={cfg.server.algorithm} normalizes by the clients' "
                         f"SGD steps and needs sgd, got {cfg.client.optimizer}")
    server_opt = SERVER_OPTIMIZERS[cfg.server.optimizer]
    if cfg.server.lr is None:
        cfg.server.lr = server_opt.default_lr
    if cfg.server.momentum is None:
        cfg.server.momentum = server_opt.default_momentum

    if cfg.server.clients_per_round > cfg.data.num_clients:
        raise ValueError(
            f"server.clients_per_round: must be <= data.num_clients ({cfg.data.num_clients}), "
            f"got {cfg.server.clients_per_round}"
        )
    if cfg.server.min_clients > cfg.server.clients_per_round:
        raise ValueError(
            f"server.min_clients: must be <= server.clients_per_round ({cfg.server.clients_per_round}), "
            f"got {cfg.server.min_clients}"
        )
    for key in ("fail_clients", "crash_clients"):
        bad = [c for c in getattr(cfg.engine, key) if not 0 <= c < cfg.data.num_clients]
        if bad:
            raise ValueError(f"engine.{key}: client ids must be in 0..{cfg.data.num_clients - 1} "
                             f"(data.num_clients={cfg.data.num_clients}), got {bad}")
    _check_data(cfg.data)
    _check_model(cfg.model)
    if cfg.model.norm_policy == "recalibrate" and cfg.model.norm != "batch":
        raise ValueError(
            f"model.norm_policy: recalibrate needs model.norm=batch (running statistics), got {cfg.model.norm}"
        )


def _check_data(d: DataConfig) -> None:
    if d.name in ("idx", "folder") and not d.root:
        what = "a folder with the four IDX files" if d.name == "idx" else "a folder with train/CLASS and test/CLASS"
        raise ValueError(f"data.root: required when data.name={d.name} ({what})")
    if d.name == "npz" and not d.path:
        raise ValueError("data.path: required when data.name=npz (a .npz file with x_train, y_train, x_test, y_test)")
    if d.path is not None and d.name != "npz":
        raise ValueError(f"data.path: only read when data.name=npz, got data.name={d.name}")
    if d.path is not None:
        absolute = os.path.abspath(os.path.expanduser(d.path))
        if absolute != d.path:
            d.path = absolute  # every process (and a --resume from another folder) reads the same file


def _check_model(m: ModelConfig) -> None:
    entry = MODELS.get(m.name)
    if entry is None:  # the user's factory: its norm layers are checked when it is built (needs torch)
        for key, default in (("dropout", 0.0), ("width", 1.0)):
            if getattr(m, key) != default:
                raise ValueError(f"model.{key}: only the built-in models take it; pass your factory's own "
                                 f"options as model.kwargs.NAME=VALUE")
        return
    if m.kwargs:
        raise ValueError(f"model.kwargs: only a model from an import path takes kwargs, not {m.name}")
    if not entry.norm_channels(m.width):  # no norm layers (simple-cnn): the norm key has nothing to act on
        if m.norm != "none" and "norm" in m.model_fields_set:
            raise ValueError(f"model.norm: {m.name} has no norm layers, so only none applies, got {m.norm}")
        m.norm = "none"
    if m.norm == "group":
        bad = sorted({c for c in entry.norm_channels(m.width) if c % m.groups})
        if bad:
            raise ValueError(
                f"model.groups: {m.groups} does not divide the channel counts {bad} of "
                f"{m.name}; choose a divisor of all of them"
            )


# ---------------------------------------------------------------------------------------------------------
# Loading, overrides, errors


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Parse ``a.b=value`` strings into a nested dict; values are read as YAML scalars (numbers, bools, lists)."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. server.rounds=20")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}': empty key part")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict,)):
            value = raw  # a scalar key never takes a mapping; keep the text and let validation name the key
        _set_dotted(nested, key, value)
    return nested


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}': not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file '{path}': cannot be read ({exc.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{path}': not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}': expected a mapping of sections (data:, model:, ...)")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then the overrides; validated and resolved."""
    tree: dict[str, Any] = read_yaml(path) if path else {}
    tree = merge(tree, parse_overrides(overrides))
    return config_from_dict(tree)


def config_from_dict(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    """One line: the first problem, naming the dotted key and what is allowed."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(err["loc"][:-1])
        return f"unknown config key '{loc}'; allowed here: {', '.join(allowed)}"
    if kind == "value_error":
        return str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
    msg = err["msg"]
    if kind == "literal_error":
        msg = msg.replace("Input should be", "must be one of")
    else:
        msg = msg[0].lower() + msg[1:] if msg else msg
    extra = f"; {len(exc.errors()) - 1} more problem(s)" if len(exc.errors()) > 1 else ""
    return f"{loc}: {msg}, got {err['input']!r}{extra}"


def _allowed_keys(section_loc: tuple) -> list[str]:
    model: type[BaseModel] = Config
    for part in section_loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        model = ann
    return list(model.model_fields)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# Keys that change how fast a run goes or what it additionally measures, never its numbers.
RESULT_NEUTRAL: tuple[tuple[str, ...], ...] = (("engine",), ("checkpoint",), ("eval", "diagnostics"), ("track",))
# Keys added after runs were cached: left out of the hashes while they hold their default (off), so that adding
# an optional feature keeps every earlier run's cache entry and checkpoint valid.
LATER_KEYS: dict[tuple[str, ...], Any] = {("server", "average"): None, ("data", "labels_per_client"): 2}


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


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every key: the config reference in --help and the docs."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            rows.append((f"{prefix}{name}", repr(default), field.description or _type_text(ann)))

    walk(Config, "")
    return rows


def keys_markdown() -> str:
    """The key reference as markdown: docs/config.md is this output (a test keeps them in sync)."""
    lines = [
        "# Config reference",
        "",
        "Generated by `fedgap keys --markdown`. Set keys in a YAML file (sections as mappings) or as dotted",
        "`key=value` overrides after it. `null` defaults are filled from `server.algorithm` (the preset) and the",
        "server optimizer; `fedgap keys --resolved [CONFIG] [OVERRIDES]` prints the resolved config.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    for key, default, text in describe_keys():
        lines.append(f"| `{key}` | `{default}` | {text.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"


def _type_text(ann: Any) -> str:
    args = getattr(ann, "__args__", None)
    if args and all(isinstance(a, str) for a in args):
        return " | ".join(args)
    text = str(ann).replace("typing.", "")
    text = text.replace("Literal[", "").replace("]", "").replace("'", "")
    return text.replace(", ", " | ")
