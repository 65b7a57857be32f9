"""What an engine hands back for a round: the surviving clients' results and the failures."""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field

from fedgap.fl.client import ClientResult


@dataclass
class ClientFailure:
    client_id: int
    reason: str  # one line: exception type and message


@dataclass
class RoundOutput:
    results: list[ClientResult]  # sorted by client id, whatever ran them
    failures: list[ClientFailure] = field(default_factory=list)


def failure_from_exception(client_id: int, exc: BaseException) -> ClientFailure:
    if os.environ.get("FEDGAP_DEBUG"):
        traceback.print_exception(exc)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return ClientFailure(client_id, f"{type(exc).__name__}: {first}".rstrip(": "))
