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

    def in_client_order(self) -> RoundOutput:
        """Sort results and failures by client id (in place), whatever order the clients finished in: the
        server aggregates in this order, so every engine sums the same floats in the same order."""
        self.results.sort(key=lambda r: r.client_id)
        self.failures.sort(key=lambda f: f.client_id)
        return self


def failure_from_exception(client_id: int, exc: BaseException) -> ClientFailure:
    if os.environ.get("FEDGAP_DEBUG"):
        traceback.print_exception(exc)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return ClientFailure(client_id, f"{type(exc).__name__}: {first}".rstrip(": "))
