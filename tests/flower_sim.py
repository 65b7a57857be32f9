"""Run exported fedgap Flower apps in Flower's simulation engine, each on a private loopback-only Ray.

    python tests/flower_sim.py NUM_SUPERNODES APP_DIR [APP_DIR ...]

Run as its own process by tests/test_export_flower.py: Ray and the apps' modules (all named fedgap_app) stay
out of the test process. Prints one line ``LISTENING <json>``: every address a process of this run listened
on while the simulations ran, read from /proc every 0.2 s.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # with node address 127.0.0.1: loopback only (docs/ray.md)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).parent))

from fedgap.engines.ray_actor import init_local_ray  # noqa: E402
from procs import descendants, listening_addresses  # noqa: E402


def watch(seen: set[str], stop: threading.Event) -> None:
    while not stop.is_set():
        seen.update(str(a) for a in listening_addresses(descendants(os.getpid())))
        time.sleep(0.2)


def simulate(app_dir: str, num_supernodes: int) -> None:
    from flwr.simulation import run_simulation

    for name in [m for m in sys.modules if m == "fedgap_app" or m.startswith("fedgap_app.")]:
        del sys.modules[name]
    sys.path.insert(0, app_dir)
    os.environ["PYTHONPATH"] = os.pathsep.join(sys.path)  # the Ray workers import the app by name
    try:
        server = importlib.import_module("fedgap_app.server_app").app
        client = importlib.import_module("fedgap_app.client_app").app
        init_local_ray(num_cpus=2)  # Flower's backend uses an initialized Ray as it is (and shuts it down)
        run_simulation(server_app=server, client_app=client, num_supernodes=num_supernodes,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        sys.path.remove(app_dir)


def main() -> None:
    num_supernodes, apps = int(sys.argv[1]), sys.argv[2:]
    seen: set[str] = set()
    stop = threading.Event()
    thread = threading.Thread(target=watch, args=(seen, stop), daemon=True)
    thread.start()
    try:
        for app in apps:
            simulate(app, num_supernodes)
    finally:
        stop.set()
        thread.join()
    print("LISTENING " + json.dumps(sorted(seen)), flush=True)


if __name__ == "__main__":
    main()
