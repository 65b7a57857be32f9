"""``fedgap export flower``: write a Flower app (flwr 1.42, message API) that runs a fedgap config.

The app is small on purpose: ``<pkg>/client_app.py`` and ``<pkg>/server_app.py`` only wire Flower's
``ClientApp`` / ``ServerApp`` to ``fedgap.export.flower_app``, which calls fedgap's own code (the client
update ``fedgap.fl.client.local_update``; the round loop's aggregation, server optimizer and evaluation). One
copy of the math: the app depends on fedgap. Beside it go the resolved ``config.yaml`` and ``partition.npz``
(client id -> its training rows, from ``fedgap.data.partition.partition_for``).

What cannot be exported is refused with one line: ``model.norm_policy=recalibrate`` (exact BatchNorm
statistics need a federated statistics pass per layer after every round) and ``eval.stop_at_target`` (the
Flower strategy runs a fixed number of rounds). Per-client state across rounds (SCAFFOLD's control variates,
FedBN's local norm layers: whatever ``local_update`` returns as the client's own state) is exported: it stays
on the client, in the ClientApp's ``context.state``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fedgap.config import Config, config_from_dict, config_to_dict, dump_yaml
from fedgap.errors import ConfigError
from fedgap.experiment import outputs

PACKAGE = "fedgap_app"
FLWR_REQUIREMENT = "flwr[simulation]>=1.42,<1.43"

NOT_EXPORTABLE = {  # (section, key, value) -> why
    ("model", "norm_policy", "recalibrate"): (
        "model.norm_policy: recalibrate cannot be exported to Flower (exact BatchNorm statistics need a "
        "federated statistics pass per layer after every round); use average or local"),
    ("eval", "stop_at_target", True): (
        "eval.stop_at_target: cannot be exported to Flower (the Flower strategy runs server.rounds rounds); "
        "set eval.stop_at_target=false"),
}


def check_exportable(cfg: Config) -> None:
    for (section, key, value), why in NOT_EXPORTABLE.items():
        if getattr(getattr(cfg, section), key) == value:
            raise ConfigError(why)


def exported_config(cfg: Config) -> Config:
    """The config the app runs: Flower is the engine, so fedgap's own engine runs only the server's
    evaluation, in-process (``engine.*`` never changes a number); tracking stays with fedgap runs."""
    tree = config_to_dict(cfg)
    tree["engine"]["name"] = "sequential"
    tree["track"] = {}
    return config_from_dict(tree)


def export_flower(cfg: Config, out: Path, *, name: str | None = None) -> Path:
    """Write the app to ``out`` (created; existing app files are replaced); returns ``out``."""
    check_exportable(cfg)
    from fedgap.data.datasets import load_dataset
    from fedgap.data.partition import partition_for

    data = load_dataset(cfg.data.name, cfg.data.root)  # a bad data setting fails before --out is touched
    parts = partition_for(cfg.data, data.train_y.numpy(), cfg.seed)
    outputs.prepare_dir(out)
    app_name = name or _project_name(out)
    cfg = exported_config(cfg)
    outputs.atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    save_partition(out / "partition.npz", parts)
    (out / PACKAGE).mkdir(exist_ok=True)
    init = f'"""{app_name}: a fedgap experiment as a Flower app."""\n'
    outputs.atomic_write_text(out / PACKAGE / "__init__.py", init)
    outputs.atomic_write_text(out / PACKAGE / "client_app.py", CLIENT_APP)
    outputs.atomic_write_text(out / PACKAGE / "server_app.py", SERVER_APP)
    outputs.atomic_write_text(out / "pyproject.toml", pyproject(app_name, cfg, out))
    outputs.atomic_write_text(out / "README.md", readme(app_name, cfg))
    return out


def save_partition(path: Path, parts: list[np.ndarray]) -> None:
    """Client i's training rows under key ``client_<i>`` (np.load reads them back; no pickle)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **{f"client_{i}": np.asarray(p, dtype=np.int64) for i, p in enumerate(parts)})
    tmp.replace(path)


def load_partition(path: Path) -> dict[int, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {int(k.split("_", 1)[1]): npz[k] for k in npz.files}


def _project_name(out: Path) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", out.resolve().name.lower()).strip("-")
    return slug if slug and slug[0].isalpha() else f"fedgap-{slug or 'app'}"


def pyproject(name: str, cfg: Config, out: Path) -> str:
    from fedgap import __version__

    return f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "fedgap experiment exported to Flower: {cfg.server.algorithm} on {cfg.data.name} ({cfg.data.partition})"
license = "MIT"
dependencies = [
    "{FLWR_REQUIREMENT}",
    "fedgap>={__version__}",  # the client update, aggregation and evaluation are fedgap's own code
]

[tool.hatch.build.targets.wheel]
packages = ["{PACKAGE}"]

[tool.flwr.app]
publisher = "fedgap"

[tool.flwr.app.components]
serverapp = "{PACKAGE}.server_app:app"
clientapp = "{PACKAGE}.client_app:app"

[tool.flwr.app.config]
# Absolute paths written by `fedgap export flower`: `flwr run` installs the app elsewhere, and a Flower app
# bundle carries no .npz file. Empty values mean: beside the app package.
config-file = "{(out / 'config.yaml').resolve()}"
partition-file = "{(out / 'partition.npz').resolve()}"
out-dir = ""  # where the ServerApp writes metrics.csv and summary.json (default: <app>/flower-run)
node-wait-seconds = 120
'''


def readme(name: str, cfg: Config) -> str:
    return f"""# {name}

A fedgap experiment ({cfg.server.algorithm}: client objective `{cfg.client.objective}`, server optimizer
`{cfg.server.optimizer}`, norm policy `{cfg.model.norm_policy}`; {cfg.server.rounds} rounds,
{cfg.server.clients_per_round} of {cfg.data.num_clients} clients per round) as a Flower app, written by
`fedgap export flower`.

- `config.yaml`: the resolved fedgap config (`fedgap run config.yaml` runs the same experiment in fedgap).
- `partition.npz`: client id -> training rows; SuperNode `partition-id=i` is fedgap's client i.
- `{PACKAGE}/client_app.py`, `{PACKAGE}/server_app.py`: Flower wiring around `fedgap.export.flower_app`.

Each round the ServerApp trains exactly the clients fedgap samples for that round, aggregates with fedgap's
server optimizer and evaluates the global model on the test set; it writes `flower-run/metrics.csv` and
`flower-run/summary.json`. It needs {cfg.data.num_clients} SuperNodes, one per fedgap client: in Flower's
simulation engine `flwr.simulation.run_simulation(server_app, client_app, num_supernodes={cfg.data.num_clients})`
(partition ids 0..{cfg.data.num_clients - 1} are assigned there), in a deployment one SuperNode per client
started with `--node-config "partition-id=I num-partitions={cfg.data.num_clients}"`. See fedgap's `docs/flower.md`.
"""


_APP_DIR = "APP_DIR = Path(__file__).resolve().parents[1]  # config.yaml and partition.npz are here\n"

CLIENT_APP = f'''"""ClientApp: one fedgap client per SuperNode (node config `partition-id` = fedgap client id).

Training is fedgap's `local_update` on this client's rows of `partition.npz`; state the client keeps across
rounds (SCAFFOLD control variates, FedBN norm layers) lives in `context.state`.
"""

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedgap.export.flower_app import client_query, client_train

{_APP_DIR}
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return client_train(msg, context, APP_DIR)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The server asks each node which fedgap client it is, to send it that client's rounds."""
    return client_query(msg, context)
'''

SERVER_APP = f'''"""ServerApp: fedgap's round loop as a Flower strategy (`fedgap.export.flower_app.FedgapStrategy`).

Each round it trains the clients fedgap's `sample_clients(seed, round, num_clients, k)` picks, aggregates
their models with fedgap's server optimizer and norm policy, and evaluates the global model on the test set.
"""

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedgap.export.flower_app import run_server

{_APP_DIR}
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context, APP_DIR)
'''
