"""What the Ray engine runs on: the client actor, a loopback-only private Ray, and a pool of idle actors.

Kept apart from ``ray_engine`` (which decides what runs where) so each fits in one reading. Nothing here imports
Ray at module level: ``fedgap.engines.ray_engine`` must import, and say how to install Ray, without it.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from fedgap.engines.results import RoundOutput
from fedgap.engines.runner import ClientRunner
from fedgap.errors import FedgapError
from fedgap.fl.client import ClientTask
from fedgap.fl.evaluate import EvalResult
from fedgap.runtime import tune_allocator

INSTALL_HINT = "engine.name=ray needs Ray, which is not installed: pip install 'fedgap[ray]'"
LOCAL_OBJECT_STORE_BYTES = 400 * 2**20  # a private Ray's object store: a round's states are far smaller


def import_ray():
    """Ray, or a one-line FedgapError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise FedgapError(INSTALL_HINT) from None
    return ray


def init_local_ray(num_cpus: int, object_store_bytes: int = LOCAL_OBJECT_STORE_BYTES) -> None:
    """Start a private Ray in this process that listens on loopback only.

    Ray binds its services to the machine's address (or all of them) unless the node address is 127.0.0.1 *and*
    its "cluster mode" is off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which Ray reads when it is imported, so the
    already-imported constant is switched too, for the start only; the daemons and workers inherit the variable).
    Seen with Ray 2.60; tests/test_ray_engine.py checks every listening port (read from /proc). No dashboard, no
    usage statistics; the workers' output is not forwarded (FEDGAP_DEBUG=1 forwards it); Ray's token
    authentication stays on.
    ``address="local"``: a new instance even when RAY_ADDRESS is set or a cluster was started here with ``ray start``
    (``ray.init()`` would join those).
    """
    ray = import_ray()
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray >= 2.5x enables token authentication for a new local cluster and warns that it did: keep it, quietly.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    cluster_mode, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
                 object_store_memory=object_store_bytes, log_to_driver=bool(os.environ.get("FEDGAP_DEBUG")),
                 logging_level=logging.WARNING, configure_logging=True)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


class ClientActor:
    """One Ray actor process: a ClientRunner, built from the run's spec (config, client hyper-parameters,
    threads) the first time the actor sees that spec, so an actor restarted by Ray after a crash, or reused by a
    later run in the same process, rebuilds it by itself. The data set is loaded once per process and kept
    (``load_dataset`` caches it), from ``data.root`` or the shipped MNIST *on the actor's node*.
    ``ray.remote`` is applied by the engine, so this module imports without Ray."""

    def __init__(self):
        tune_allocator()
        self.runner: ClientRunner | None = None
        self._built: str | None = None  # the spec the runner was built from
        self._cache: dict[str, tuple[str, object]] = {}

    def ready(self) -> int:
        return os.getpid()

    def _fetch(self, name: str, ref):
        """The object behind ``ref``, deserialized once and reused for every call with the same ref (the global
        state of a round: once per actor per round, however many clients the actor runs)."""
        import ray

        held = self._cache.get(name)
        if held is None or held[0] != ref.hex():
            self._cache.pop(name, None)  # free the previous copy first
            self._cache[name] = (ref.hex(), ray.get(ref))
        return self._cache[name][1]

    def prepare(self, spec_box: list) -> ClientRunner:
        cfg, hp, threads = self._fetch("spec", spec_box[0])
        if self._built != spec_box[0].hex():
            torch.set_num_threads(threads)
            self.runner = ClientRunner(cfg, None, hp)
            self._built = spec_box[0].hex()
        return self.runner

    def start(self, spec_box: list) -> tuple[int, int]:
        """Build the runner now (the data set loads during start-up, not in round 1): (pid, torch threads)."""
        self.prepare(spec_box)
        return os.getpid(), torch.get_num_threads()

    def train(self, spec_box: list, ctx_box: list, task: ClientTask, crash: bool) -> RoundOutput:
        if crash:  # fault injection (engine.crash_clients): die as a crashed process would, before any result
            os._exit(1)
        runner = self.prepare(spec_box)
        # Arguments arrive as read-only views of Ray's buffers; the runner wants its own index array.
        task = ClientTask(task.client_id, np.array(task.indices, dtype=np.int64), task.own)
        return runner.train(self._fetch("ctx", ctx_box[0]), [task])

    def evaluate_test_rows(self, spec_box: list, state_box: list, start: int, stop: int,
                           train_mode: bool) -> EvalResult:
        runner = self.prepare(spec_box)
        return runner.evaluate_test_rows(self._fetch("eval", state_box[0]), start, stop, train_mode=train_mode)


# Idle actors left by finished runs on a Ray connection this process borrowed (a notebook, a test module):
# the next run takes them instead of starting processes and importing torch again. Keyed by the connection
# (job and node id) and the resources they hold; a run takes the matching ones and ends the others of its
# connection (their reservations could block its new actors); those of an ended connection died with it.
_POOL: dict[tuple, list] = {}


def pool_key(ray, cpus: float, gpus: float) -> tuple | None:
    """The pool of this connection and resource shape; None (no pooling) where Ray cannot say (Ray Client)."""
    try:
        ctx = ray.get_runtime_context()
        return ctx.get_job_id(), ctx.get_node_id(), cpus, gpus
    except Exception:
        return None


def take_pooled(ray, key: tuple, n: int) -> list:
    mine = _POOL.pop(key, [])
    for other in list(_POOL):
        stale = _POOL.pop(other)
        if other[:2] == key[:2]:
            kill_all(ray, stale)
    kill_all(ray, mine[n:])
    return mine[:n]


def give_back(key: tuple, actors: list) -> None:
    _POOL.setdefault(key, []).extend(actors)


def kill_all(ray, actors: list) -> None:
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass
