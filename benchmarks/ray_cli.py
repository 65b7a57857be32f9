"""Ray engine against the local engines, through the real command line (what a user runs).

    .venv/bin/python benchmarks/ray_cli.py                      # default experiment, 10 rounds, 2 passes
    .venv/bin/python benchmarks/ray_cli.py --engines sequential sequential,engine.threads=1 ray --repeats 1

Each run is ``python -m fedgap run engine.name=E [engine.address=local] server.rounds=N --out DIR --quiet`` in its
own process; engines are interleaved and the sequence repeated, so a slow phase of a shared machine hits all of
them, and the best pass of each is shown. Per run: seconds per round (median of rounds 2..N: round 1 warms up
oneDNN and the allocator, and is shown apart), fedgap's start-up (data, partition, model, workers or Ray and
its actors) and launch-to-exit wall time (interpreter and imports included). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXTRA = {"ray": ["engine.address=local"]}
EXPERIMENT = ["data.alpha=0.5"]  # issue 5's default experiment (the config default is now 0.1)


def run_once(runner: str, rounds: int, out: Path) -> dict:
    engine, *overrides = runner.split(",")  # e.g. "sequential,engine.threads=1"
    args = [sys.executable, "-m", "fedgap", "run", f"engine.name={engine}", *EXTRA.get(engine, []), *EXPERIMENT,
            *overrides, f"server.rounds={rounds}", "--out", str(out), "--quiet", "--overwrite"]
    t0 = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "FEDGAP_NO_DOWNLOAD": "1"})
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{engine}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    summary = json.loads((out / "summary.json").read_text())
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    seconds = [float(r["seconds"]) for r in rows]
    return {"engine": runner, "seconds_per_round": statistics.median(seconds[1:] or seconds),
            "first_round": seconds[0], "startup": summary["startup_seconds"], "wall": wall,
            "accuracy": summary["final_test_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="+", default=["sequential", "parallel", "ray"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the runs here")
    opts = ap.parse_args()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fedgap-raybench-") as tmp:
        for rep in range(opts.repeats):
            for engine in opts.engines:
                result = run_once(engine, opts.rounds, Path(tmp) / f"run-{len(runs)}")
                print(f"pass {rep + 1}: {result}", file=sys.stderr, flush=True)
                runs.append(result)
    if opts.json:
        opts.json.write_text(json.dumps(runs, indent=2) + "\n")
    print(f"{dt.date.today().isoformat()}, {os.cpu_count()} cores, {opts.rounds} rounds, best of {opts.repeats}\n")
    print("| engine | s/round (rounds 2-N) | round 1 | start-up (fedgap) | launch to exit | final accuracy |")
    print("|---|---|---|---|---|---|")
    for engine in opts.engines:
        mine = [r for r in runs if r["engine"] == engine]
        best = min(mine, key=lambda r: r["seconds_per_round"])
        startup = min(r["startup"] for r in mine)
        wall = min(r["wall"] for r in mine)
        print(f"| {engine} | {best['seconds_per_round']:.2f} | {best['first_round']:.2f} | {startup:.1f} s | "
              f"{wall:.1f} s | {best['accuracy']:.2%} |")


if __name__ == "__main__":
    main()
