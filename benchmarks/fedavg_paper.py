"""Reproduce the FedAvg paper's MNIST CNN rows (McMahan et al. 2017, Table 2): rounds to reach 99% test accuracy
with C=0.1 (10 of 100 clients per round), plain SGD, B=10, and E=1 or E=5, on an IID split and on the
pathological non-IID split (2 shards of ~300 samples per client, at most 2 labels each). Then the same non-IID
split with a server-side remedy.

    python benchmarks/fedavg_paper.py [--rows NAME ...] [--lr 0.1] [--engine sequential] [--out runs/paper]

Each row is one `fedgap run` (through the library), cached in --out by config hash and resumable, stopping at
the first evaluation that reaches 99% (eval.stop_at_target). Results go to --out/results.json and a markdown
table on stdout. The published numbers are the paper's Table 2 (CNN, MNIST).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedgap.config import load_config, results_hash
from fedgap.experiment.loop import Experiment

COMMON = ["model.name=cnn", "model.norm=none", "data.num_clients=100", "server.clients_per_round=10",
          "client.optimizer=sgd", "client.momentum=0", "client.batch_size=10", "eval.target=0.99",
          "eval.stop_at_target=true"]
IID = ["data.partition=iid"]
NON_IID = ["data.partition=shards", "data.shards_per_client=2"]

AVERAGE_ETA = 9.0  # server.average of the averaging rows: the full doctor's choice on the default setting
# FedAdam's server lr chosen on a validation split of this setting, never on test: `fedgap sweep` of the
# E1-noniid-fedadam row with data.validation=0.1, server.lr=0.001,0.003,0.01,0.03, 100 rounds, the highest
# validation accuracy (mean of the last 3 evaluations) wins (benchmarks/README.md has the command and numbers)
FEDADAM_VAL_LR = 0.01

# name: (published rounds or None, overrides, round cap)
ROWS: dict[str, tuple[int | None, list[str], int]] = {
    "E1-iid": (34, [*IID, "client.epochs=1"], 150),
    "E1-noniid": (350, [*NON_IID, "client.epochs=1"], 700),
    "E5-iid": (20, [*IID, "client.epochs=5"], 100),
    "E5-noniid": (229, [*NON_IID, "client.epochs=5"], 500),
    "E1-noniid-fedavgm": (None, [*NON_IID, "client.epochs=1", "server.algorithm=fedavgm", "server.momentum=0.9",
                                 "server.lr=1.0"], 700),
    "E1-noniid-fedadam": (None, [*NON_IID, "client.epochs=1", "server.algorithm=fedadam", "server.lr=0.003"], 700),
    "E1-noniid-fedadam-val": (None, [*NON_IID, "client.epochs=1", "server.algorithm=fedadam",
                                     f"server.lr={FEDADAM_VAL_LR}"], 700),
    # the same with the running average (eta 9): on the validation split it scored 98.22% after 100 rounds
    # against 97.95% without, so it is the validation's choice of the two; training is the same as above
    "E1-noniid-fedadam-val-average": (None, [*NON_IID, "client.epochs=1", "server.algorithm=fedadam",
                                             f"server.lr={FEDADAM_VAL_LR}", f"server.average={AVERAGE_ETA}"], 700),
    "E1-noniid-scaffold": (None, [*NON_IID, "client.epochs=1", "server.algorithm=scaffold"], 700),
    # the label-skew remedy at its default tau 1 (balanced softmax), not tuned here; alone and under FedAdam
    "E1-noniid-logit-adjust": (None, [*NON_IID, "client.epochs=1", "client.objective=logit_adjust"], 700),
    # FedDyn (alpha 0.01, the full doctor's choice on the default setting), alone and joined to logit adjustment
    "E1-noniid-feddyn": (None, [*NON_IID, "client.epochs=1", "client.objective=feddyn", "objective.feddyn.alpha=0.01"],
                         700),
    "E1-noniid-logit-adjust-feddyn": (None, [*NON_IID, "client.epochs=1", "client.objective=logit_adjust+feddyn",
                                             "objective.feddyn.alpha=0.01"], 700),
    "E1-noniid-logit-adjust-fedadam": (None, [*NON_IID, "client.epochs=1", "client.objective=logit_adjust",
                                              "server.algorithm=fedadam", "server.lr=0.003"], 700),
    # server-side model averaging (server.average = eta, the value the full doctor chose on the default setting's
    # validation split; not tuned here): on FedAvg, FedAdam and FedDyn as above. The evaluated model, and so the
    # round that first reaches 99%, is the average.
    "E1-noniid-average": (None, [*NON_IID, "client.epochs=1", f"server.average={AVERAGE_ETA}"], 700),
    "E1-noniid-fedadam-average": (None, [*NON_IID, "client.epochs=1", "server.algorithm=fedadam", "server.lr=0.003",
                                         f"server.average={AVERAGE_ETA}"], 700),
    "E1-noniid-feddyn-average": (None, [*NON_IID, "client.epochs=1", "client.objective=feddyn",
                                        "objective.feddyn.alpha=0.01", f"server.average={AVERAGE_ETA}"], 700),
}


def run_row(name: str, lr: float, engine: str, out: Path, extra: list[str]) -> dict:
    published, overrides, cap = ROWS[name]
    cfg = load_config(overrides=[*COMMON, *overrides, f"client.lr={lr}", f"server.rounds={cap}",
                                 f"engine.name={engine}", *extra])
    run_dir = out / f"{name}-{results_hash(cfg)}"
    resume = (run_dir / "checkpoint.pt").exists()
    t0 = time.perf_counter()
    summary = Experiment(cfg, run_dir, resume=resume, label=name).run()
    return {
        "row": name,
        "published_rounds_to_99": published,
        "rounds_to_99": summary["rounds_to_target"],
        "rounds_run": summary["rounds_completed"],
        "diverged_at_round": summary.get("diverged_at_round"),
        "best_test_accuracy": summary["best_test_accuracy"],
        "client_lr": lr,
        "server": f"{cfg.server.optimizer} lr={cfg.server.lr}" + (f" momentum={cfg.server.momentum}"
                                                                  if cfg.server.optimizer == "momentum" else "")
                  + (f" average={cfg.server.average:g}" if cfg.server.average is not None else ""),
        "seconds_per_round": summary["seconds_per_round"],
        "wall_seconds_this_call": time.perf_counter() - t0,
        "run_dir": str(run_dir),
        "command": "fedgap run " + " ".join([*COMMON, *overrides, f"client.lr={lr}", f"server.rounds={cap}"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--lr", type=float, default=0.1, help="client learning rate (plain SGD)")
    parser.add_argument("--engine", default="sequential")
    parser.add_argument("--out", type=Path, default=Path("runs/paper"))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every row")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    for name in args.rows:
        row = run_row(name, args.lr, args.engine, args.out, args.overrides)
        # read again just before writing: rows may run in several processes at once
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        results[name] = row
        results_path.write_text(json.dumps(results, indent=2))
    results = json.loads(results_path.read_text())
    print("| row | published rounds to 99% | fedgap rounds to 99% | best accuracy | client lr | server |")
    print("|---|---|---|---|---|---|")
    for name in args.rows:
        r = results[name]
        reached = r["rounds_to_99"] if r["rounds_to_99"] is not None else f"not in {r['rounds_run']}"
        if r.get("diverged_at_round"):
            reached = f"diverged at round {r['diverged_at_round']}"
        print(f"| {name} | {r['published_rounds_to_99'] or '-'} | {reached} | {r['best_test_accuracy']:.2%} | "
              f"{r['client_lr']} | {r['server']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
