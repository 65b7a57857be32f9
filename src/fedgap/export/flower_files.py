"""The text of the files ``fedgap export flower`` writes: the app's pyproject.toml, its two Flower entry points,
the SuperLink connection for the ``flwr`` CLI and the README. Templates only; ``fedgap.export.flower`` decides
what goes into them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI reads the defaults here without importing the config (and torch)
    from fedgap.config import Config

PACKAGE = "fedgap_app"
# Base flwr: a deployment (SuperLink, SuperNodes, flwr CLI) needs no simulation extra; Flower's simulation
# engine needs `flwr[simulation]` (which pins its own Ray), see docs/flower.md.
FLWR_REQUIREMENT = "flwr>=1.42,<1.43"
CONNECTION = "superlink.toml"
DEFAULT_SUPERLINK = "127.0.0.1:8000"  # flower-superlink's default --host and --port
# Seconds the ServerApp waits for a round's replies (run config reply-timeout-seconds): a lost SuperNode costs a
# round at most this; a client whose local training takes longer is counted as failed.
REPLY_TIMEOUT = 600.0


def pyproject(name: str, cfg: Config, out: Path, reply_timeout: float) -> str:
    from fedgap import __version__

    out = out.resolve()
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
# bundle carries no .npz file. Empty values mean: beside the installed app package.
config-file = "{out / 'config.yaml'}"
partition-file = "{out / 'partition.npz'}"
out-dir = "{out / 'flower-run'}"  # where the ServerApp writes metrics.csv, summary.json and model.pt
node-wait-seconds = 120  # how long the ServerApp waits for all data.num_clients SuperNodes before round 1
reply-timeout-seconds = {reply_timeout:g}  # the longest a round waits for its clients' replies
'''


def connection(name: str, superlink: str, root_certificates: Path | None) -> str:
    if root_certificates is None:
        security = ("insecure = true  # no TLS: only for a SuperLink on this machine; "
                    "re-export with --root-certificates CA.pem for TLS")
    else:
        security = (f'root-certificates = "{root_certificates.resolve()}"  # the CA that signed the SuperLink\'s '
                    "certificate")
    return f'''# The SuperLink connection for `flwr run . {name}`, `flwr ls {name}`, `flwr log RUN_ID {name}` and
# `flwr supernode register KEY.pub {name}`: copy this table into the Flower CLI's config file,
# $FLWR_HOME/config.toml (default ~/.flwr/config.toml), e.g.  cat {CONNECTION} >> ~/.flwr/config.toml
[superlink.{name}]
address = "{superlink}"
{security}
'''


def readme(name: str, cfg: Config, superlink: str) -> str:
    n = cfg.data.num_clients
    return f"""# {name}

A fedgap experiment ({cfg.server.algorithm}: client objective `{cfg.client.objective}`, server optimizer
`{cfg.server.optimizer}`, norm policy `{cfg.model.norm_policy}`; {cfg.server.rounds} rounds,
{cfg.server.clients_per_round} of {n} clients per round) as a Flower app (flwr 1.42), written by
`fedgap export flower`.

- `config.yaml`: the resolved fedgap config (`fedgap run config.yaml` runs the same experiment in fedgap).
- `partition.npz`: client id -> training rows; SuperNode `partition-id=i` is fedgap's client i.
- `{PACKAGE}/client_app.py`, `{PACKAGE}/server_app.py`: Flower wiring around `fedgap.export.flower_app`.
- `{CONNECTION}`: the SuperLink connection `{name}` for the `flwr` CLI (address `{superlink}`).

Each round the ServerApp trains exactly the clients fedgap samples for that round, aggregates with fedgap's
server optimizer and evaluates the global model on the test set; it writes `metrics.csv`, `summary.json` and
`model.pt` to `out-dir` (`[tool.flwr.app.config]`, default `flower-run/` here). It needs {n} SuperNodes, one per
fedgap client, each with fedgap, the data set of the config and this folder at the same path.

## Deploy on one machine (no TLS)

```bash
flower-superlink --insecure --disable-runtime-dependency-installation          # serves 127.0.0.1:8000
flower-supernode --insecure --superlink 127.0.0.1:8000 --port 9094 --node-config "partition-id=0 num-partitions={n}"
# ... one per client: partition-id=0..{n - 1}, each with its own --port
cat {CONNECTION} >> ~/.flwr/config.toml                                      # once
flwr run . {name}                                                             # then: flwr ls {name}
```

## Deploy with TLS and SuperNode authentication

TLS: the SuperLink serves its certificate (for the address the SuperNodes and the `flwr` CLI use) and both
verify it with the CA certificate. Authentication: the SuperLink accepts only SuperNodes whose public key was
registered with it; each SuperNode signs its requests with its private key. Export with the CA so that
`{CONNECTION}` carries it: `fedgap export flower config.yaml --out . --overwrite --superlink HOST:8000
--root-certificates ca.crt`.

```bash
flower-superlink --host 0.0.0.0 --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key \\
    --enable-supernode-auth --disable-runtime-dependency-installation
ssh-keygen -t ecdsa -b 384 -N "" -f node-0                                   # on SuperNode 0: node-0, node-0.pub
flwr supernode register node-0.pub {name}                                    # on the CLI's machine, per SuperNode
flower-supernode --superlink HOST:8000 --root-certificates ca.crt --auth-supernode-private-key node-0 \\
    --node-config "partition-id=0 num-partitions={n}"
flwr run . {name}
```

A SuperNode whose key was not registered is refused; one without the CA certificate cannot connect. A SuperNode
lost during a run: its client counts as failed in that round (after `reply-timeout-seconds` at most) and in
later rounds; the run goes on while at least `server.min_clients` clients reply, and otherwise stops with one
line in `flwr ls` (status `finished:failed`). See fedgap's `docs/flower.md`.
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
