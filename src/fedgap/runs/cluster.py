"""The doctor's runs on a Ray cluster (``fedgap doctor --cluster``): each run still to do is one Ray task.

What travels, and where the cache lives: the run cache stays in ``--out`` on the machine that started the doctor
(``fedgap.runs.cache``), so an interrupted doctor resumes there as it does without a cluster, and no node needs a
shared file system. The pool's planning is reused as it is (``run_all``: finished runs are reused without Ray, a
longer run is seeded from a shorter finished one); only the runs still to do go to the cluster. A task gets
what its run folder held (a checkpoint to resume from, its metrics.csv and config.yaml) as bytes, runs
``fedgap.runs.pool.execute`` in a temporary folder on its node with ``threads`` intra-op threads (its ``num_cpus``),
and returns the folder's files as bytes; the driver writes them into the local run folder (each file atomically,
summary.json last: a run is finished exactly when it exists) as each task ends (``ray.wait``).

Same numbers as the local pool: a run computes exactly what it computes in a pool process with the same threads
(the search above it, successive halving and forward selection, is unchanged), so gap.csv and recommended.yaml
are identical to the local pool's at the same ``--threads`` (tests/test_cluster.py, on a three-node Ray cluster).

Faults: a task whose node dies is run again by Ray on another node (``max_retries``) from the bytes it was sent,
i.e. from the checkpoint its run had at the start of the call: the unit redone is one run's segment of one rung
(or one combination step), never a finished run, whose files are already in the local cache. A run that raises
is a failed record, as in the local pool. Tracking (``track.*``) stays on this machine: a task runs without it
and the driver logs each finished run from its files (``track_cached``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedgap.config import Config, config_to_dict
from fedgap.errors import ConfigError
from fedgap.experiment import outputs
from fedgap.files import atomic_write_bytes
from fedgap.runs.cluster_connect import check_fits, check_nodes, connected, ray_error_line
from fedgap.runs.pool import default_jobs, default_threads, execute, run_all
from fedgap.runs.records import RunRecord, RunSpec
from fedgap.track.command import track_cached

NODE_RETRIES = 3  # times Ray runs a task again after its node or worker process died
WAIT_SECONDS = 0.5
TASK_TITLE = "ray::run_remote"  # a worker process's title while it runs a task of this module (tests find them so)


def run_remote(name: str, cfg_tree: dict[str, Any], diagnostics: bool, threads: int,
               files: dict[str, bytes]) -> dict[str, bytes]:
    """A Ray task on a worker node: the run folder's files in, the finished folder's files out."""
    import torch

    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="fedgap-run-"))
    try:
        run_dir = tmp / name
        run_dir.mkdir()
        for file_name, data in files.items():
            (run_dir / file_name).write_bytes(data)
        execute(name, cfg_tree, str(run_dir), diagnostics, threads)
        return folder_files(run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def folder_files(run_dir: Path) -> dict[str, bytes]:
    """A run folder's files (not its lock or an atomic write's leftovers), by name."""
    if not run_dir.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file() and not p.name.startswith(".")}


def write_back(run_dir: Path, files: dict[str, bytes]) -> None:
    """The finished run's files into its local folder, each atomically, summary.json last."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in sorted(files, key=lambda n: n == outputs.SUMMARY):
        atomic_write_bytes(run_dir / name, files[name])


def remote_tree(cfg: Config, gpus_per_run: float) -> dict[str, Any]:
    """The config a task runs: tracking stays on the driver; a run with a GPU share trains on it (Ray makes the
    task's GPU its ``cuda`` device)."""
    tree = config_to_dict(cfg)
    tree["track"] = {**tree.get("track", {}), "tensorboard": None, "mlflow": None}
    if gpus_per_run > 0:
        tree["engine"] = {**tree.get("engine", {}), "device": "cuda"}
    return tree


def cluster_backend(ray, gpus_per_run: float = 0.0):
    """A ``run_all`` backend sending each run to the cluster as one task (module docstring)."""
    task = ray.remote(run_remote)

    def run(todo: list[tuple[int, RunSpec, Path]], threads: int,
            finish: Callable[[int, RunSpec, Path, str | None], RunRecord]) -> None:
        refs = {}
        for i, spec, run_dir in todo:
            ref = task.options(num_cpus=threads, num_gpus=gpus_per_run, max_retries=NODE_RETRIES,
                               retry_exceptions=False).remote(spec.name, remote_tree(spec.cfg, gpus_per_run),
                                                        spec.diagnostics, threads, folder_files(run_dir))
            refs[ref] = (i, spec, run_dir)
        pending = list(refs)
        try:
            while pending:
                # a timeout hands control back to Python now and then: Ctrl-C would otherwise wait for a task to end
                done, pending = ray.wait(pending, num_returns=1, timeout=WAIT_SECONDS)
                for ref in done:
                    i, spec, run_dir = refs.pop(ref)  # no reference kept: the store frees the result
                    error = None
                    try:
                        write_back(run_dir, ray.get(ref))
                    except ray.exceptions.RayError as exc:
                        error = ray_error_line(exc)
                    record = finish(i, spec, run_dir, error)
                    if record.ok:
                        track_cached(record)  # track.*: logged here, from the files that came back
        except BaseException:
            for ref in pending:  # their runs resume from the checkpoint in the local cache next time
                ray.cancel(ref, force=True)
            raise

    return run


@contextmanager
def cluster_runner(out: Path, cluster: str, naive: Config, *, jobs: int | None = None, threads: int | None = None,
                   gpus_per_run: float = 0.0, show_progress: bool = True) -> Iterator[Callable]:
    """The doctor's run function on a Ray cluster (a ``fedgap.diagnose.tuning.RunFn``), its runs cached under
    ``out``: joins the cluster and checks it before yielding, leaves it when the block ends. The threads per run
    default to the local pool's (cores // jobs here); a ``local`` cluster gets CPUs for ``jobs`` runs at once."""
    if naive.engine.name == "ray":
        raise ConfigError("engine.name=ray: --cluster already spreads the doctor's runs over the cluster; run each "
                          "with engine.name=sequential")
    if naive.engine.device != "cpu" and gpus_per_run <= 0:
        raise ConfigError(f"engine.device={naive.engine.device}: on a cluster a run gets a GPU only with "
                          f"--gpus-per-run (a share of one per run)")
    jobs = jobs or default_jobs(naive)
    threads = threads or default_threads(jobs)
    with connected(cluster, jobs * threads) as ray:
        check_nodes(ray)
        check_fits(ray, threads, gpus_per_run)
        backend = cluster_backend(ray, gpus_per_run)

        def run(specs: Sequence[RunSpec], title: str) -> list[RunRecord]:
            return run_all(specs, out, jobs=jobs, threads=threads, title=title, show_progress=show_progress,
                           backend=backend)

        yield run


__all__ = ["cluster_backend", "cluster_runner", "folder_files", "run_remote", "write_back"]
