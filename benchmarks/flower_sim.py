"""The plain loop's experiment (benchmarks/plain_loop.py) written as a typical Flower 1.42 app, run in Flower's
simulation engine: the Flower runner of ``make bench`` (``flower-sim`` in benchmarks/run_engines.py).

    .venv-flower-sim/bin/python benchmarks/flower_sim.py data.alpha=0.5 server.rounds=6

Flower's message API, as its templates write it:

- ``ClientApp`` (``client_app``), ``train`` handler: the received ``ArrayRecord`` becomes a torch state dict
  loaded into the model, ``plain_loop.train_client`` trains it on the node's client (node config
  ``partition-id`` = fedgap client id, its rows from fedgap's ``partition_for``), and the reply carries the
  arrays and ``num-examples``. One intra-op thread per client process.
- ``ServerApp``: Flower's built-in ``FedAvg`` (``flwr.serverapp.strategy``) with ``fraction_train`` =
  ``server.clients_per_round / data.num_clients`` and ``min_train_nodes`` = ``server.clients_per_round`` (exactly
  k nodes train), no client-side evaluation, and server-side evaluation of the test set after every round by
  ``evaluate_fn`` (``plain_loop.evaluate``). One subclass, ``SameClientsFedAvg``, changes two things and no
  math: FedAvg samples k nodes at random; the subclass re-addresses its k messages to the nodes of fedgap's
  ``sample_clients`` for the round (node ids are random in the simulation: the server learns which node holds
  which client by one query message per node before round 1), and hands the replies to FedAvg's aggregation in
  client-id order (Flower collects them in arrival order; the sum of float32 arrays depends on the order). So
  the same clients train on the same rows, in the same batch order (``plain_loop.seed_client``), and the
  weighted average adds them up as the plain loop does.
- ``flwr.simulation.run_simulation`` on Ray (a private, loopback-only Ray of ``--cpus`` CPUs, 2 by default),
  ``client_resources`` 1 CPU: 2 client processes of 1 CPU and 1 thread each, the best case for Flower on 2 cores.
  The ServerApp (aggregation and evaluation) runs in this process, in a thread of Flower's, with torch's default
  intra-op threads, as the plain loop's evaluation does.

Prints one JSON line: the measurements ``run_engines.child`` returns (round 1 is a warm-up, left out of the
medians), plus the sampled clients, samples and accuracy of every round. A round's wall time is the time between
two calls of ``evaluate_fn`` (end of the previous evaluation to end of this one: send, train, receive, aggregate,
evaluate); ``train_seconds`` ends where the evaluation starts (so it includes Flower's aggregation). Start-up is
everything from after ``import torch`` to the start of round 1: ``import flwr``, Ray, the actors, the node
query, the server's data and model. ``--save-model PATH`` writes the final global state dict (torch.save).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

STARTED = time.time()
HERE = Path(__file__).resolve().parent
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("FEDGAP_NO_DOWNLOAD", "1")

import torch  # noqa: E402

from fedgap.config import load_config  # noqa: E402

IMPORTED = time.time()  # run_engines.child's marks: before import torch, after it and fedgap's config

import plain_loop  # noqa: E402  (benchmarks/ is on sys.path: this script's folder, and PYTHONPATH in the actors)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from fedgap.export.flower_app import client_query, discover  # noqa: E402

NODE_WAIT_SECONDS = 300.0  # for the SuperNodes to answer the partition query (a loaded machine starts slowly)


# ------------------------------------------------------------------------------------------------ ClientApp
client_app = ClientApp()


@functools.cache
def client_setup(overrides: tuple[str, ...]):
    """(config, training set, partition, model) of this client process, built once, as a Flower app keeps its
    data set in a module-level cache."""
    from torch.utils.data import TensorDataset

    from fedgap.data.datasets import load_dataset
    from fedgap.data.partition import partition_for
    from fedgap.experiment.loop import initial_model

    torch.set_num_threads(1)  # one thread per client process (client_resources num_cpus=1)
    cfg = load_config(overrides=list(overrides))
    data = load_dataset(cfg.data.name, cfg.data.root)
    parts = partition_for(cfg.data, data.train_y.numpy(), cfg.seed)
    return cfg, TensorDataset(data.train_x, data.train_y), parts, initial_model(cfg, data)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    conf = msg.content["config"]
    cfg, train_set, parts, model = client_setup(tuple(conf["overrides"]))
    cid = int(context.node_config["partition-id"])
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    plain_loop.seed_client(cfg, int(conf["server-round"]), cid)
    state, num_examples, seen = plain_loop.train_client(model, train_set, parts[cid].tolist(), cfg)
    metrics = MetricRecord({"num-examples": num_examples, "samples": seen, "partition-id": cid})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


client_app.query()(client_query)  # replies with the node's partition-id (fedgap.export.flower_app)


# ------------------------------------------------------------------------------------------------ ServerApp
class SameClientsFedAvg(FedAvg):
    """Flower's FedAvg, training fedgap's sampled clients of each round and aggregating their replies in client-id
    order (see the module docstring); records the clients and samples of every round."""

    def __init__(self, cfg, **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg
        self.node_of: dict[int, int] = {}  # fedgap client id -> Flower node id
        self.clients: dict[int, list[int]] = {}
        self.samples: dict[int, int] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        from fedgap.experiment.loop import sample_clients

        if not self.node_of:
            self.node_of = discover(grid, self.cfg.data.num_clients, NODE_WAIT_SECONDS)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        d = self.cfg.data
        clients = [int(c) for c in sample_clients(self.cfg.seed, server_round, d.num_clients,
                                                  self.cfg.server.clients_per_round)]
        if len(messages) != len(clients):
            raise RuntimeError(f"FedAvg sampled {len(messages)} nodes, fedgap {len(clients)} clients")
        for message, client in zip(messages, clients, strict=True):
            message.metadata.dst_node_id = self.node_of[client]
        self.clients[server_round] = clients
        return messages

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        failed = [m.error.reason for m in replies if m.has_error()]
        if failed:  # FedAvg would average the others: the benchmark would do less work than the plain loop
            raise RuntimeError(f"round {server_round}: {len(failed)} clients failed, first: {failed[0]}")
        replies.sort(key=lambda m: int(m.content["metrics"]["partition-id"]))
        got = [int(m.content["metrics"]["partition-id"]) for m in replies]
        if got != self.clients[server_round]:
            raise RuntimeError(f"round {server_round}: replies of clients {got}, sent to {self.clients[server_round]}")
        self.samples[server_round] = sum(int(m.content["metrics"]["samples"]) for m in replies)
        return super().aggregate_train(server_round, replies)


def make_server_app(cfg, overrides: list[str], record: dict) -> ServerApp:
    """The ServerApp of this run; it fills ``record`` (timestamps, rows, final state)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        from torch.utils.data import TensorDataset

        from fedgap.data.datasets import load_dataset
        from fedgap.experiment.loop import initial_model

        data = load_dataset(cfg.data.name, cfg.data.root)
        test_set = TensorDataset(data.test_x, data.test_y)
        model = initial_model(cfg, data)
        k, n = cfg.server.clients_per_round, cfg.data.num_clients
        strategy = SameClientsFedAvg(cfg, fraction_train=min(k, n) / n, min_train_nodes=min(k, n),
                                     fraction_evaluate=0.0, min_available_nodes=n)
        marks = record["marks"]  # (round, start of evaluate_fn, end of evaluate_fn)

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            start = time.time()
            if server_round == 0:  # Flower evaluates the initial model; the plain loop does not: skipped
                marks.append((0, start, start))
                return None
            model.load_state_dict(arrays.to_torch_state_dict())
            accuracy, loss = plain_loop.evaluate(model, test_set)
            marks.append((server_round, start, time.time()))
            prev_end = marks[-2][2]
            record["rows"].append({"round": server_round, "seconds": marks[-1][2] - prev_end,
                                   "train_seconds": start - prev_end, "samples": strategy.samples[server_round],
                                   "clients": strategy.clients[server_round], "test_accuracy": accuracy,
                                   "test_loss": loss})
            return MetricRecord({"accuracy": accuracy, "loss": loss})

        result = strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=cfg.server.rounds,
                                train_config=ConfigRecord({"overrides": overrides}), evaluate_fn=evaluate_fn)
        record["state"] = result.arrays.to_torch_state_dict()

    return server_app


def simulate(overrides: list[str], cpus: int, marks: tuple[float, float, float]) -> tuple[dict, dict]:
    """Run the experiment of ``overrides`` in Flower's simulation; returns (measurements, final state dict).
    ``marks``: (launched, started, imported) of the process (see IMPORTED)."""
    launched, started, imported = marks
    cfg = load_config(overrides=overrides)
    from flwr.simulation import run_simulation

    from fedgap.engines.ray_actor import init_local_ray

    # the actors import this module and plain_loop by name (Flower's own Ray start would set this; ours is first)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), *sys.path])
    init_local_ray(num_cpus=cpus)  # loopback only; Flower's backend uses an initialized Ray as it is, and stops it
    record: dict = {"marks": [], "rows": [], "state": None}
    run_simulation(server_app=make_server_app(cfg, overrides, record), client_app=client_app,
                   num_supernodes=cfg.data.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    rows = record["rows"]
    if len(rows) != cfg.server.rounds:
        raise RuntimeError(f"{len(rows)} of {cfg.server.rounds} rounds completed")
    startup = record["marks"][0][1] - imported
    measured = rows[1:] if len(rows) > 1 else rows  # round 1 warms up (the actors load the data set)
    result = {
        "seconds_per_round": statistics.median(r["seconds"] for r in measured),
        "train_seconds_per_round": statistics.median(r["train_seconds"] for r in measured),
        "train_images_per_second": sum(r["samples"] for r in measured) / sum(r["train_seconds"] for r in measured),
        "samples_per_round": statistics.mean(r["samples"] for r in measured),
        "startup_seconds": startup,
        "launch_to_ready_seconds": (imported - launched) + startup,
        "import_seconds": imported - started,
        "rounds": len(rows),
        "final_test_accuracy": rows[-1]["test_accuracy"],
        "client_processes": cpus,
        "per_round": rows,
    }
    return result, record["state"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="fedgap config overrides (key=value), as for fedgap run")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the private Ray = client processes")
    parser.add_argument("--launched", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save-model", default=None, help="write the final global state dict here")
    args = parser.parse_args()
    # the ClientApp must be pickled by reference to an importable module, not as __main__: run from the import
    import flower_sim

    result, state = flower_sim.simulate(args.overrides, args.cpus, (args.launched or STARTED, STARTED, IMPORTED))
    if args.save_model:
        torch.save(state, args.save_model)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
