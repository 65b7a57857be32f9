"""Joining the Ray cluster the doctor's runs go to (``fedgap doctor --cluster``), and the checks made before any run
starts: the cluster answers, every node has this fedgap and torch, the GPU share per run fits.

``local`` starts a private Ray here on loopback only (``fedgap.engines.ray_actor.init_local_ray``) with ``--jobs``
CPUs; ``auto`` joins a cluster started on this machine with ``ray start`` (or named by RAY_ADDRESS); ``HOST:PORT``
(or ``ray://HOST:PORT``) joins that cluster. A Ray connection this process already holds (a notebook, a test) is
borrowed and left running; one made here is shut down when the doctor ends.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fedgap.engines.ray_actor import import_ray, init_local_ray
from fedgap.engines.ray_address import check_reachable, first_line, ray_error_line
from fedgap.engines.ray_address import host_port as parse_host_port
from fedgap.errors import ConfigError, FedgapError

PROBE_TIMEOUT = 300.0  # seconds for every node to answer the version probe (a busy node starts a worker first)


@contextmanager
def connected(cluster: str, cpus: int) -> Iterator[Any]:
    """The ``ray`` module, connected to ``cluster`` for the duration of the block (module docstring)."""
    ray = import_ray()
    owned = False
    if not ray.is_initialized():
        if cluster == "local":
            init_local_ray(cpus)
        else:
            _join(ray, cluster)
        owned = True
    try:
        yield ray
    finally:
        if owned:
            ray.shutdown()


def _join(ray, cluster: str) -> None:
    check_reachable(host_port(cluster), cluster, "--cluster", "--cluster local")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(address=cluster, log_to_driver=bool(os.environ.get("FEDGAP_DEBUG")), logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        auth = "" if os.environ.get("RAY_AUTH_MODE") else (
            "; a cluster with token authentication needs RAY_AUTH_MODE=token and its token")
        raise FedgapError(f"--cluster: cannot join the Ray cluster at {cluster!r} ({first_line(exc)}){auth}") from None


def host_port(cluster: str) -> tuple[str, int] | None:
    """(host, port) of a cluster address; None for local and auto; a ConfigError for anything else."""
    return parse_host_port(cluster, "--cluster", "local, auto, HOST:PORT or ray://HOST:PORT")


def versions() -> tuple[str, str]:
    """(fedgap version, torch version) of this process: the probe a node runs, and what it must answer."""
    import torch

    import fedgap

    return fedgap.__version__, torch.__version__


def check_nodes(ray) -> None:
    """One tiny task on every alive node with CPUs returns its fedgap and torch versions; a node without fedgap,
    or with other versions than this machine's, is one line before anything runs (a run's numbers depend on
    both)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    want = versions()
    probe = ray.remote(num_cpus=0, max_retries=0)(versions)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if not nodes:
        raise FedgapError("--cluster: the Ray cluster has no node with CPUs")
    refs = [(probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(), n)
            for n in nodes]
    for ref, node in refs:
        where = f"node {node.get('NodeManagerAddress')} ({node['NodeID'][:8]})"
        try:
            got = tuple(ray.get(ref, timeout=PROBE_TIMEOUT))
        except ray.exceptions.GetTimeoutError:
            raise FedgapError(f"--cluster: {where} did not answer within {PROBE_TIMEOUT:.0f} s") from None
        except ray.exceptions.RayError as exc:
            raise FedgapError(f"--cluster: {where} cannot run fedgap ({ray_error_line(exc)}); install fedgap {want[0]} "
                              f"with torch {want[1]} on every node") from None
        if got != want:
            raise FedgapError(f"--cluster: {where} has fedgap {got[0]} with torch {got[1]}, this machine fedgap "
                              f"{want[0]} with torch {want[1]}; install the same versions on every node")


def check_fits(ray, threads: int, gpus_per_run: float) -> None:
    """A run's task reserves ``threads`` CPUs and ``gpus_per_run`` of a GPU: one node must hold that, or Ray would
    wait forever for a node that does."""
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if gpus_per_run > 0 and gpus < gpus_per_run:
        raise ConfigError(f"--gpus-per-run: {gpus_per_run:g} of a GPU per run, but the Ray cluster has {gpus:g} GPUs")
    most = max((n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    if threads > most:
        raise ConfigError(f"--threads: {threads} CPUs per run, but no node of the Ray cluster has more than {most:g}")


__all__ = ["check_fits", "check_nodes", "connected", "host_port", "versions", "ray_error_line"]
