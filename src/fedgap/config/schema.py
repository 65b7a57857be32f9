"""The config schema: one pydantic section per part of an experiment, every key with its default and meaning.

Component names (objectives, server optimizers, presets, norm policies, engines, built-in models) come from
their registries, the single source: a new component is a valid config value, described in ``fedgap keys``, by
adding its registry line. The engine and model tables are torch-free name tables (``fedgap.engines.names``,
``fedgap.models.registry``); nothing here builds a model or imports an engine. Cross-key rules live in
``fedgap.config.resolve``, loading and overrides in ``fedgap.config.load``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from fedgap.config.resolve import check_import_path, resolve
from fedgap.engines.names import ENGINES
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
    bn_momentum: float | None = Field(None, gt=0, le=1, description=(
        "every BatchNorm layer's momentum in torch's convention (weight of the new batch statistics; Keras' "
        "momentum=0.99 is 0.01 here); none = the model's own"))
    bn_eps: float | None = Field(None, gt=0, description="every BatchNorm layer's eps; none = the model's own")

    @field_validator("name")
    @classmethod
    def _known_or_importable(cls, name: str) -> str:
        if name in MODELS:
            return name
        if not is_import_path(name):
            raise ValueError(f"model.name: must be one of {names_text()} or package.module:factory or "
                             f"path/to/file.py:factory, got {name!r}")
        try:  # torch-free: the path's form and that its file or top-level package exists (built: fedgap.models)
            return check_import_path(name)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


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
        None, description=(
        "parallel: how workers start (default: fork on Linux, else spawn; spawn on cuda)"))
    threads: int | None = Field(None, ge=1, description="intra-op threads in the main process")
    device: str = Field("cpu", description=(
        "torch device the clients train on: cpu, cuda, cuda:N (sequential, parallel, vectorized; ray: cpu only)"))
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
            resolve(self)
        finally:
            object.__setattr__(self, "_resolving", False)
        return self
