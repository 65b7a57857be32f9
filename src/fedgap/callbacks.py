"""The round callback base class: what a run calls out to at the end of every round and when it ends.

Cross-cutting concerns (stop rules, diagnostics, experiment tracking, progress reports) are callbacks, not
branches in the round loop. Every hook is a no-op here, so a callback overrides only what it uses and says so
(the pattern of pfl-research's ``TrainingProcessCallback``). A leaf module: the loop (``fedgap.experiment``) calls
the hooks, and trackers (``fedgap.track``) and the run executor (``fedgap.runs``) subclass it.
"""

from __future__ import annotations

from typing import Any


class RoundCallback:
    def on_round_end(self, info) -> dict[str, Any]:
        """After every round (``info``: ``fedgap.experiment.loop.RoundInfo``); returns extra metrics-row columns."""
        return {}

    def stop_reason(self, rows: list[dict[str, Any]]) -> str | None:
        """A reason to end the run after the rounds ``rows`` (target reached, diverged), or None to go on. Asked
        after every round and when a resumed run starts (a run a rule stopped is finished)."""
        return None

    def on_run_end(self, view, summary: dict[str, Any] | None) -> None:
        """Once when the run ends, finished or not (``summary`` None then); ``view`` is the run's ``RunView``."""
