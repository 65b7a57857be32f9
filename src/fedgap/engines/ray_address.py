"""Ray cluster addresses and Ray errors as one line: shared by the Ray engine (``engine.address``) and the doctor's
cluster runs (``--cluster``, ``fedgap.runs.cluster_connect``). Torch-free and Ray-free."""

from __future__ import annotations

import socket

from fedgap.errors import ConfigError, FedgapError


def host_port(address: str, key: str, forms: str) -> tuple[str, int] | None:
    """(host, port) of a cluster address; None for local and auto; a ConfigError naming ``key`` (and the accepted
    ``forms``) for anything else."""
    if address in ("local", "auto"):
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{key}: must be {forms}, got {address!r}")
    return host.strip("[]"), int(port)


def check_reachable(target: tuple[str, int] | None, address: str, key: str, use_local: str,
                    timeout: float = 5.0) -> None:
    """A clear error for an address where nothing listens: Ray itself retries such an address for minutes."""
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as exc:
        raise FedgapError(f"{key}: nothing answers at {address!r} ({exc.strerror or exc}); start a cluster with "
                          f"`ray start --head` or use {use_local}") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def ray_error_line(exc: BaseException) -> str:
    """One line from a Ray error: the exception raised in the task or actor (a DataError, a ModuleNotFoundError)
    if there is one."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and not type(cause).__module__.startswith("ray"):
        return f"{type(cause).__name__}: {first_line(cause)}"
    return first_line(exc)[:300]
