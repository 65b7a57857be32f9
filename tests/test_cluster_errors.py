"""``fedgap doctor --cluster``: what is refused in one line, exit code 2, before any run and before --out is
touched, without starting Ray (the cluster itself: tests/test_cluster.py, make test-slow)."""

from __future__ import annotations

import pytest

from conftest import cli, tiny_args

pytest.importorskip("ray")


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedgap: error:") and "Traceback" not in err, err
    return lines[0].removeprefix("fedgap: error: ")


@pytest.mark.parametrize(("extra", "message"), [
    (["--cluster", "127.0.0.1:1"], "--cluster: nothing answers at '127.0.0.1:1' ("),
    (["--cluster", "nowhere"], "--cluster: must be local, auto, HOST:PORT or ray://HOST:PORT, got 'nowhere'"),
    (["--gpus-per-run", "0.5"], "--gpus-per-run: a GPU share per run is asked of a Ray cluster; give --cluster too"),
    (["engine.name=ray", "--cluster", "local"], "engine.name=ray: --cluster already spreads the doctor's runs"),
    (["engine.device=cuda", "--cluster", "local"], "engine.device=cuda: on a cluster a run gets a GPU only with"),
], ids=["unreachable", "malformed", "gpus-without-cluster", "ray-engine", "device-without-gpus"])
def test_a_cluster_the_doctor_cannot_use_is_one_line_before_anything_runs(tiny_idx, tmp_path, capsys, extra, message):
    import ray

    out = tmp_path / "d"
    code, _, err = cli("doctor", *tiny_args(tiny_idx), *extra, "--out", str(out), "--quiet", capsys=capsys)
    assert code == 2 and one_error_line(err).startswith(message), err
    assert not out.exists() and not ray.is_initialized()
