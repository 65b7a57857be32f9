"""A run's ``summary.json``: final and best accuracy, rounds, wall time, throughput, from its metrics rows."""

from __future__ import annotations

from typing import Any

import torch

from fedgap import __version__
from fedgap.config import Config, results_hash
from fedgap.experiment.stopping import StopOnDivergence


def run_summary(cfg: Config, rows: list[dict[str, Any]], rounds: int, wall_seconds: float, startup_seconds: float,
                *, has_validation: bool, personal: bool, initial_digest: str | None = None) -> dict[str, Any]:
    accs = [(r["round"], r["test_accuracy"]) for r in rows if r.get("test_accuracy") is not None]
    target = cfg.eval.target
    samples = sum(r["samples"] for r in rows)
    train_seconds = sum(r.get("train_seconds") or 0.0 for r in rows)
    final = rows[-1] if rows else {}
    summary = {
        "final_test_accuracy": accs[-1][1] if accs else None,
        "best_test_accuracy": max(a for _, a in accs) if accs else None,
        "final_test_loss": final.get("test_loss"),
        "rounds_completed": rounds,
        "rounds_to_target": next((rnd for rnd, a in accs if a >= target), None),
        "diverged_at_round": StopOnDivergence.diverged_at(rows),
        "target_accuracy": target,
        "wall_seconds": wall_seconds + startup_seconds,
        "seconds_per_round": wall_seconds / max(len(rows), 1),
        "startup_seconds": startup_seconds,
        "train_samples": samples,
        "train_samples_per_second": samples / train_seconds if train_seconds > 0 else None,
        "clients_failed": sum(r.get("clients_failed", 0) for r in rows),
        "engine": cfg.engine.name,
        "intra_op_threads": torch.get_num_threads(),  # of this process (a parallel engine's workers use 1)
        "config_hash": results_hash(cfg),
        # SHA-256 of the initial model's state (fedgap.fl.state.digest): equal for runs that started from the same
        # weights, whichever process or runtime built them (a fedgap run and its exported Flower app)
        "initial_model_sha256": initial_digest,
        "fedgap_version": __version__,
    }
    if has_validation:
        vals = [r["val_accuracy"] for r in rows if r.get("val_accuracy") is not None]
        summary["final_val_accuracy"] = vals[-1] if vals else None
        summary["best_val_accuracy"] = max(vals) if vals else None
    if personal:
        values = [r["personal_accuracy"] for r in rows if r.get("personal_accuracy") is not None]
        summary["final_personal_accuracy"] = values[-1] if values else None
    return summary
