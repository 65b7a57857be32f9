"""Engine benchmark: seconds per round, training images/s and GFLOP/s, startup and peak memory of every
registered fedgap engine, of a plain PyTorch loop (benchmarks/plain_loop.py) and of the same experiment as a
Flower 1.42 app in Flower's simulation engine (benchmarks/flower_sim.py), all in one run so that the ratios are
fair; plus the machine's dense fp32 matmul rate, measured in the same run, as the compute limit.

    .venv/bin/python benchmarks/run_engines.py            # `make bench`; about 10 minutes on 2 cores
    .venv/bin/python benchmarks/run_engines.py --quick    # 3 rounds, one pass: a smoke test

Every runner runs in its own subprocess (a fresh interpreter: no thread or allocator setting leaks between
runners, and the process tree's memory is its own). Runners are interleaved and the whole sequence is repeated
(``--repeats``), so slow phases of a shared machine hit all of them; the table shows the best pass of each and
the spread between passes. ``flower-sim`` runs in .venv-flower-sim's Python (``flwr[simulation]`` pins an older
Ray than fedgap's ray extra; ``make bench`` builds it first), for the default and small-batch experiments only,
and is shown as skipped when that environment is missing. Writes benchmarks/results/engines.json and the
"## Engines" section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "engines.json"
README = HERE / "README.md"
BEGIN, END = "<!-- engines:begin -->", "<!-- engines:end -->"

# The default experiment of issue 5 (the config defaults of its day: mobilenet-like with batch norm, 100
# Dirichlet(0.5) clients, 10 per round, 1 local epoch, batch 32, SGD, evaluation of the 10k test set every round).
# data.alpha is pinned because the config default has since become 0.1: the recorded timings stay comparable.
ISSUE5 = ["data.alpha=0.5"]
EXPERIMENTS = {
    "default": ISSUE5,
    "small-batch": [*ISSUE5, "client.batch_size=10"],
    "10k-clients": ["data.partition=iid", "data.num_clients=10000", "server.clients_per_round=100"],
}
PLAIN = "plain-loop"
FLOWER = "flower-sim"
SIM_PY = HERE.parent / ".venv-flower-sim" / "bin" / "python"
# The 10,000-client case checks memory at scale: fedgap's in-process engines only (time budget of make bench).
SKIP = {"10k-clients": {PLAIN, FLOWER, "ray"}}
TARGETS = {"default": 3.0, "small-batch": 4.0}


# ------------------------------------------------------------------------------------------------ children

def child(kind: str, experiment: str, rounds: int, launched: float) -> dict:
    """One runner in this (fresh) process; returns its measurements."""
    started = time.time()
    import torch  # noqa: F401  (timed: the import is part of a real run's start)

    from fedgap.config import load_config

    imported = time.time()
    cfg = load_config(overrides=[*EXPERIMENTS[experiment], f"server.rounds={rounds}",
                                 f"engine.name={kind if kind != PLAIN else 'sequential'}"])
    if kind == PLAIN:
        sys.path.insert(0, str(HERE))
        import plain_loop

        marks = {}
        rows = plain_loop.run(cfg, rounds, on_round=lambda row: marks.setdefault("first", time.time()))
        startup = (marks["first"] - imported) - rows[0]["seconds"]
        accuracy = rows[-1]["test_accuracy"]
    else:
        from fedgap.experiment.loop import Experiment

        exp = Experiment(cfg, None, show_progress=False)
        summary = exp.run()
        rows, startup, accuracy = exp.rows, summary["startup_seconds"], summary["final_test_accuracy"]
    measured = rows[1:] if len(rows) > 1 else rows  # round 1 warms up (allocations, oneDNN primitives)
    return {
        "seconds_per_round": statistics.median(r["seconds"] for r in measured),
        "train_seconds_per_round": statistics.median(r["train_seconds"] for r in measured),
        "train_images_per_second": sum(r["samples"] for r in measured) / sum(r["train_seconds"] for r in measured),
        "samples_per_round": statistics.mean(r["samples"] for r in measured),
        "startup_seconds": startup,  # data, partition, model, workers: what fedgap reports as startup
        "launch_to_ready_seconds": (imported - launched) + startup,  # + interpreter and import torch
        "import_seconds": imported - started,
        "rounds": len(rows),
        "final_test_accuracy": accuracy,
    }


# ------------------------------------------------------------------------------------------------ parent

def tree_memory(proc) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) over a process and its descendants. PSS splits shared pages (the forked
    workers' copy-on-write data, torch's libraries) between the processes sharing them: the honest total."""
    import psutil

    rss = pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, pss


def flower_missing() -> str | None:
    """Why the flower-sim runner cannot run here (None if it can)."""
    if not SIM_PY.exists():
        return f"{SIM_PY.parent.parent.name} is missing (make bench builds it)"
    return None


def measure(kind: str, experiment: str, rounds: int, timeout: float) -> dict:
    """One runner in a fresh subprocess, with the peak memory of its process tree. Ray's processes (GCS, raylet,
    its workers and agents) are started by the runner's process and are its descendants, so they are counted."""
    import psutil

    launched = time.time()
    if kind == FLOWER:
        if (why := flower_missing()) is not None:
            return {"skipped": why}
        command = [str(SIM_PY), str(HERE / "flower_sim.py"), *EXPERIMENTS[experiment], f"server.rounds={rounds}",
                   "--launched", str(launched)]
    else:
        command = [sys.executable, __file__, "--child", kind, experiment, str(rounds), str(launched)]
    proc = subprocess.Popen(command,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FEDGAP_NO_DOWNLOAD": "1"})
    handle = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            return {"error": f"timed out after {timeout:.0f} s"}
        try:
            rss, pss = tree_memory(handle)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return {"error": (err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}
    result = json.loads(out.strip().splitlines()[-1])
    result.update(peak_rss_mb=peak_rss / 2**20, peak_pss_mb=peak_pss / 2**20)
    return result


def engine_names() -> list[str]:
    """Every registered engine that imports here (vectorized and ray join when they are registered)."""
    from fedgap.engines import ENGINES, engine_class

    names = []
    for name in ENGINES:
        try:
            engine_class(name)
            names.append(name)
        except Exception as exc:  # e.g. ray not installed
            print(f"skipping engine {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return names


def matmul_gflops(threads: int, n: int = 2048, reps: int = 10) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def model_flops(overrides: list[str]) -> dict:
    """FLOPs per image of mobilenet-like (a multiply-add = 2): the forward pass counted by torch's
    FlopCounterMode (convolutions and matrix products; norm and activation layers are not counted), training =
    3 x forward (the backward pass computes input and weight gradients, each costing one forward). The
    backward pass is not counted directly: FlopCounterMode's count of convolution_backward ignores the groups
    of depthwise convolutions (it reports 10.7 MFLOP per image for this backward instead of about 3.8)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fedgap.config import load_config
    from fedgap.models import build_model

    cfg = load_config(overrides=overrides)
    model = build_model(cfg.model).eval()
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        model(x)
    per_image = forward.get_total_flops() / 32
    return {"train_flops_per_image": 3 * per_image, "eval_flops_per_image": per_image}


def best_pass(passes: list[dict]) -> dict:
    ok = [p for p in passes if "error" not in p and "skipped" not in p]
    if not ok:
        return passes[-1]
    best = dict(min(ok, key=lambda p: p["seconds_per_round"]))
    times = [p["seconds_per_round"] for p in ok]
    best["spread"] = max(times) / min(times) - 1 if len(times) > 1 else 0.0
    return best


def ratio_to(runners: dict, reference: str, b: dict) -> str:
    """How many times faster per round a runner's best pass ``b`` is than ``reference``'s: its s/round over b's."""
    ref = runners.get(reference, {}).get("best", {})
    return f"{ref['seconds_per_round'] / b['seconds_per_round']:.2f}×" if "seconds_per_round" in ref else "-"


def table(results: dict, machine: dict, flops: dict) -> str:
    peak = machine["matmul_gflops_2_threads"]
    lines = []
    for experiment, runners in results.items():
        lines += [f"**{experiment}** (`{' '.join(EXPERIMENTS[experiment]) or 'defaults'}`)", "",
                  "| runner | s/round | train img/s | train GFLOP/s | % of matmul | startup s | launch→ready s "
                  "| peak PSS MB | peak RSS-sum MB | × plain loop | × flower-sim | spread |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, entry in runners.items():
            b = entry["best"]
            if "error" in b or "skipped" in b:
                shown = f"failed: {b['error']}" if "error" in b else f"skipped: {b['skipped']}"
                lines.append(f"| {name} | {shown} | | | | | | | | | | |")
                continue
            gflops = b["train_images_per_second"] * flops["train_flops_per_image"] / 1e9
            lines.append(
                f"| {name} | {b['seconds_per_round']:.3f} | {b['train_images_per_second']:,.0f} | {gflops:.1f} | "
                f"{100 * gflops / peak:.0f}% | {b['startup_seconds']:.2f} | {b['launch_to_ready_seconds']:.2f} | "
                f"{b['peak_pss_mb']:.0f} | {b['peak_rss_mb']:.0f} | "
                f"{ratio_to(runners, PLAIN, b)} | {ratio_to(runners, FLOWER, b)} | {100 * b['spread']:.0f}% |")
        lines.append("")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    section = f"{BEGIN}\n{text}\n{END}"
    if README.exists():
        old = README.read_text()
        if BEGIN in old and END in old:
            new = old[: old.index(BEGIN)] + section + old[old.index(END) + len(END):]
        else:
            new = old.rstrip() + "\n\n## Engines\n\n" + section + "\n"
    else:
        new = ("# Benchmarks\n\nMeasured on the project's machine; every number below was printed by the script "
               "named with it.\n\n## Engines\n\n" + section + "\n")
    README.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per runner (the first is a warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="passes over all runners")
    parser.add_argument("--experiments", nargs="*", default=list(EXPERIMENTS))
    parser.add_argument("--runners", nargs="*", default=None, help="subset of runners (default: all)")
    parser.add_argument("--quick", action="store_true", help="3 rounds, one pass, no README update")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per runner before it is killed")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, experiment, rounds, launched = args.child
        print(json.dumps(child(kind, experiment, int(rounds), float(launched))))
        return
    if args.quick:
        args.rounds, args.repeats = 3, 1
    t0 = time.time()
    import torch

    runners = args.runners or [PLAIN, FLOWER, *engine_names()]
    machine = {
        "cpus": len(os.sched_getaffinity(0)), "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__, "python": platform.python_version(),
        "matmul_gflops_2_threads": matmul_gflops(2), "matmul_gflops_1_thread": matmul_gflops(1),
    }
    flops = model_flops([])
    print(f"dense fp32 matmul (2048x2048): {machine['matmul_gflops_2_threads']:.1f} GFLOP/s with 2 threads, "
          f"{machine['matmul_gflops_1_thread']:.1f} with 1; mobilenet-like: "
          f"{flops['train_flops_per_image'] / 1e6:.2f} MFLOP per training image, "
          f"{flops['eval_flops_per_image'] / 1e6:.2f} per test image", file=sys.stderr)
    results: dict[str, dict] = {e: {r: {"passes": []} for r in runners if r not in SKIP.get(e, ())}
                                for e in args.experiments}
    for rep in range(args.repeats):
        for experiment in args.experiments:
            for runner in results[experiment]:
                r = measure(runner, experiment, args.rounds, args.timeout)
                results[experiment][runner]["passes"].append(r)
                shown = (r.get("error") or r.get("skipped")
                         or f"{r['seconds_per_round']:.3f} s/round, {r['peak_pss_mb']:.0f} MB")
                print(f"pass {rep + 1} {experiment:12s} {runner:12s} {shown}", file=sys.stderr)
    for runners_ in results.values():
        for entry in runners_.values():
            entry["best"] = best_pass(entry["passes"])
    command = "python benchmarks/run_engines.py " + " ".join(sys.argv[1:])
    date = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = table(results, machine, flops)
    header = (f"Measured {date} with `{command.strip()}` ({time.time() - t0:.0f} s; {machine['cpus']} cores, "
              f"torch {machine['torch']}). Dense fp32 matmul: {machine['matmul_gflops_2_threads']:.1f} GFLOP/s "
              f"(2 threads), {machine['matmul_gflops_1_thread']:.1f} (1 thread); mobilenet-like "
              f"{flops['train_flops_per_image'] / 1e6:.2f} MFLOP per training image (3 × forward; "
              f"convolutions and linear layers, counted by FlopCounterMode), "
              f"{flops['eval_flops_per_image'] / 1e6:.2f} per test image. "
              f"s/round: median over rounds 2..{args.rounds}, evaluation of the 10k test set included; "
              f"best of {args.repeats} pass(es), spread = slowest/fastest pass − 1.\n")
    print(header + "\n" + text)
    if not args.no_write and not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"date": date, "command": command, "machine": machine, "flops": flops,
                                       "rounds": args.rounds, "repeats": args.repeats, "results": results},
                                      indent=1) + "\n")
        write_readme(header + "\n" + text)


if __name__ == "__main__":
    main()
