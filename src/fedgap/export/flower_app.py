"""The fedgap side of an exported Flower app (flwr 1.42, message API): what its ClientApp and ServerApp call.

Nothing here re-implements fedgap's math; it moves states between Flower messages and fedgap's own code:

- ClientApp ``train``: ``fedgap.fl.client.local_update`` on the node's client (node config ``partition-id``
  = fedgap client id; its rows from ``partition.npz``), with the ``ClientHParams`` of the embedded config and
  the client's state across rounds (``ClientResult.own``: SCAFFOLD's c_i, FedBN's norm layers) kept in
  ``context.state``.
- ServerApp: ``FedgapStrategy``, a Flower ``Strategy`` around a fedgap ``Experiment`` and its public round API:
  each round it sends the global model to exactly the clients the loop's ``plan_round`` picks
  (``sample_clients(seed, round, num_clients, k)``; Flower's own node sampling is not used, so both runs train
  the same clients), and closes the round with the loop's ``finish_round`` on the replies (aggregation in
  client-id order: weighted mean in float64, server optimizer, norm policy, the objective's server state; the
  evaluation on the test set every ``eval.every`` rounds; the metrics row), and writes ``metrics.csv`` and
  ``summary.json`` as ``fedgap run`` does, plus the final global model (``model.pt``, a state_dict; under
  ``server.average`` the running average, the model fedgap evaluates).

States travel as ``ArrayRecord`` (numpy float32/int64 arrays: exact). The server learns which node holds which
client by a ``query`` message to every node before the first round.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgap.config import load_config
from fedgap.engines.results import ClientFailure, RoundOutput
from fedgap.errors import FedgapError
from fedgap.experiment import outputs
from fedgap.export.flower import load_partition
from fedgap.export.flower_files import REPLY_TIMEOUT
from fedgap.fl.client import ClientResult, ClientTask, RoundContext, local_update
from fedgap.fl.state import State

OWN = "fedgap.own."  # context.state keys of the client's own state, one ArrayRecord per part
MODEL = "model.pt"  # the final global state_dict, written beside metrics.csv and summary.json
log = logging.getLogger("fedgap.flower")


# ------------------------------------------------------------------------------------------------ records
def to_record(state: State) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict(dict(state))


def to_state(record: ArrayRecord) -> State:
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in record.items()}


def app_paths(context: Context, app_dir: Path) -> tuple[Path, Path]:
    """(config.yaml, partition.npz): the run config's paths, else the files beside the app package."""
    rc = context.run_config
    config = Path(str(rc.get("config-file") or app_dir / "config.yaml"))
    partition = Path(str(rc.get("partition-file") or app_dir / "partition.npz"))
    return config, partition


def partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise FedgapError("node config: needs partition-id (the fedgap client id this SuperNode holds)")
    return int(context.node_config["partition-id"])


# ------------------------------------------------------------------------------------------------ client
@functools.cache
def client_setup(config_file: Path, partition_file: Path):
    """(config, partition, ClientRunner) of this process, built once: the data set, one model (laid out as
    fedgap's engines lay it out) and the client hyper-parameters."""
    from fedgap.engines.runner import ClientRunner

    cfg = load_config(config_file)
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    return cfg, load_partition(partition_file), ClientRunner(cfg)


def client_train(msg: Message, context: Context, app_dir: Path) -> Message:
    _, parts, runner = client_setup(*app_paths(context, app_dir))
    cid = partition_id(context)
    conf = msg.content["config"]
    if int(conf["client-id"]) != cid:
        raise FedgapError(f"node holds client {cid}, asked to train client {conf['client-id']}")
    r = int(conf["server-round"])
    ctx = RoundContext(r, to_state(msg.content["arrays"]), to_state(msg.content["payload"]), runner.hp.lr_scale(r))
    own = {k[len(OWN):]: to_state(rec) for k, rec in context.state.array_records.items() if k.startswith(OWN)}
    res = local_update(runner.model, runner.data.train_x, runner.data.train_y, ctx, ClientTask(cid, parts[cid], own),
                       runner.hp)
    for part, state in res.own.items():  # stays on the client
        context.state[OWN + part] = to_record(state)
    metrics = MetricRecord({"num-examples": res.num_samples, "train-loss": res.train_loss, "samples": res.samples,
                            "steps": res.steps, "client-id": cid})
    content = RecordDict({"arrays": to_record(res.state), "upload": to_record(res.upload), "metrics": metrics})
    return Message(content, reply_to=msg)


def client_query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id(context)})}), reply_to=msg)


# ------------------------------------------------------------------------------------------------ server
def discover(grid: Grid, num_clients: int, wait_seconds: float) -> dict[int, int]:
    """fedgap client id -> node id, asked of every node once all ``num_clients`` are connected."""
    deadline = time.monotonic() + wait_seconds
    while len(node_ids := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise FedgapError(f"only {len(node_ids)} of data.num_clients={num_clients} SuperNodes connected "
                              f"within {wait_seconds:g} s")
        time.sleep(0.2)
    nodes: dict[int, int] = {}
    asked = set(node_ids)
    errors: list[str] = []
    while asked and time.monotonic() < deadline:  # a node whose query failed (a slow start) is asked again
        asks = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in sorted(asked)]
        for reply in grid.send_and_receive(asks, timeout=max(1.0, deadline - time.monotonic())):
            if reply.has_error():
                errors.append(reply.error.reason)
                log.warning("node %d did not answer the partition query: %s", reply.metadata.src_node_id,
                            reply.error.reason)
                continue
            nodes[int(reply.content["metrics"]["partition-id"])] = reply.metadata.src_node_id
            asked.discard(reply.metadata.src_node_id)
        if asked:
            time.sleep(0.5)
    if asked:
        raise FedgapError(f"{len(asked)} of {len(node_ids)} SuperNodes did not say which client they hold within "
                          f"{wait_seconds:g} s" + (f" (last error: {errors[-1]})" if errors else ""))
    return nodes


class FedgapStrategy(Strategy):
    """fedgap's round loop, one Flower round at a time (see the module docstring), through the loop's public
    round API: ``plan_round`` when Flower asks which clients train, ``finish_round`` with their replies."""

    def __init__(self, cfg, out: Path | None = None, node_wait_seconds: float = 120.0,
                 reply_timeout_seconds: float = REPLY_TIMEOUT):
        from fedgap.experiment.loop import Experiment

        self.exp = Experiment(cfg, None, show_progress=False, label="flower")
        self.exp.engine.start()  # fedgap's engine only evaluates here, in this process
        self.out, self.node_wait, self.reply_timeout = out, node_wait_seconds, reply_timeout_seconds
        self.nodes: dict[int, int] = {}
        self.plan = None
        self.unreachable: list[int] = []
        # this round's train messages and their fedgap client ids; a message's id is set when Flower pushes it (the
        # deployment runtime uses its object id, the simulation runtime a fresh uuid), so it is read after the push
        self.sent: list[tuple[Message, int]] = []

    def summary(self) -> None:
        c = self.exp.cfg
        log.info("fedgap %s: objective %s, server optimizer %s, norm policy %s, %d of %d clients per round",
                 c.server.algorithm, c.client.objective, c.server.optimizer, c.model.norm_policy,
                 c.server.clients_per_round, c.data.num_clients)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        if not self.nodes:
            self.nodes = discover(grid, self.exp.cfg.data.num_clients, self.node_wait)
        self.plan = self.exp.plan_round()
        if self.plan.round != server_round:
            raise FedgapError(f"Flower asked for round {server_round}, fedgap's next round is {self.plan.round}")
        sampled = [t.client_id for t in self.plan.tasks]
        # a node the SuperLink no longer lists as online (lost, stopped) is not sent anything: it counts as failed
        online = set(grid.get_node_ids())
        self.unreachable = [c for c in sampled if self.nodes.get(c) not in online]
        payload = to_record(self.plan.context.payload)
        messages = [Message(RecordDict({"arrays": arrays, "payload": payload,
                                        "config": ConfigRecord({"server-round": server_round, "client-id": c})}),
                            dst_node_id=self.nodes[c], message_type=MessageType.TRAIN)
                    for c in sampled if c not in self.unreachable]
        self.sent = [(m, int(m.content["config"]["client-id"])) for m in messages]
        return messages

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        exp, cfg = self.exp, self.exp.cfg
        replies = list(replies)
        sent = {m.metadata.message_id: c for m, c in self.sent}
        results = sorted((_result(m) for m in replies if not m.has_error()), key=lambda r: r.client_id)
        errors = [m.error.reason for m in replies if m.has_error()]
        for reason in errors:
            log.warning("round %d: a client failed: %s", server_round, reason)
        silent = sorted({c for _, c in self.sent} - {sent.get(m.metadata.reply_to_message_id) for m in replies})
        if silent:
            log.warning("round %d: clients %s did not reply within %g s", server_round, silent, self.reply_timeout)
        if self.unreachable:
            log.warning("round %d: clients %s are on no online SuperNode", server_round, self.unreachable)
        if len(results) < cfg.server.min_clients:
            first = f" (first client error: {errors[0]})" if errors else \
                f" ({len(silent)} did not reply within {self.reply_timeout:g} s, {len(self.unreachable)} on no " \
                f"online SuperNode)"
            raise FedgapError(f"round {server_round}: {len(results)} clients replied, fewer than "
                              f"server.min_clients={cfg.server.min_clients}{first}")
        # sampled clients without a result: an error reply, no reply within the timeout, or no online node
        failures = [ClientFailure(sent.get(m.metadata.reply_to_message_id, -1), m.error.reason)
                    for m in replies if m.has_error()]
        failures += [ClientFailure(c, f"no reply within {self.reply_timeout:g} s") for c in silent]
        failures += [ClientFailure(c, "on no online SuperNode") for c in self.unreachable]
        row = exp.finish_round(self.plan, RoundOutput(results, failures))  # the loop's own round: one copy
        if self.out is not None:
            outputs.write_metrics(self.out / outputs.METRICS, exp.rows)
        return to_record(exp.server.model), MetricRecord({"train-loss": row["train_loss"], "samples": row["samples"]})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> list[Message]:
        return []  # fedgap evaluates the global model on the server's test set (in ``finish_round``)

    def aggregate_evaluate(self, server_round: int, replies) -> MetricRecord | None:
        return None

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """The centralized evaluation Flower calls after every round (and before the first): the round's test
        metrics, measured by ``finish_round`` (none before the first round or between evaluation rounds)."""
        row = self.exp.rows[-1] if server_round > 0 and self.exp.rows else {}
        if row.get("test_accuracy") is None:
            return None
        return MetricRecord({"test-accuracy": row["test_accuracy"], "test-loss": row["test_loss"]})

    def finish(self) -> dict[str, Any]:
        summary = self.exp.summary()
        summary["engine"] = "flower"
        if self.out is not None:
            outputs.write_json(self.out / outputs.SUMMARY, summary)
            torch.save(self.exp.server.evaluated(), self.out / MODEL)
        self.exp.engine.close()
        return summary


def _result(msg: Message) -> ClientResult:
    m = msg.content["metrics"]
    return ClientResult(client_id=int(m["client-id"]), num_samples=int(m["num-examples"]),
                        state=to_state(msg.content["arrays"]), train_loss=float(m["train-loss"]),
                        samples=int(m["samples"]), steps=int(m["steps"]), upload=to_state(msg.content["upload"]))


def run_server(grid: Grid, context: Context, app_dir: Path) -> dict[str, Any]:
    """The ServerApp's main: fedgap's experiment as a Flower strategy; returns the run summary."""
    config_file, _ = app_paths(context, app_dir)
    cfg = load_config(config_file)
    out = Path(str(context.run_config.get("out-dir") or app_dir / "flower-run"))
    outputs.prepare_dir(out)
    outputs.atomic_write_text(out / outputs.CONFIG, config_file.read_text())
    rc = context.run_config
    strategy = FedgapStrategy(cfg, out, float(rc.get("node-wait-seconds", 120)),
                              float(rc.get("reply-timeout-seconds", REPLY_TIMEOUT)))
    # a bounded wait for each round's replies: a lost SuperNode costs at most this, never a hang
    strategy.start(grid, to_record(strategy.exp.server.model), num_rounds=cfg.server.rounds,
                   timeout=strategy.reply_timeout,
                   evaluate_fn=strategy.evaluate)
    return strategy.finish()
