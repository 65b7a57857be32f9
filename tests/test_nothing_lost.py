"""Nothing lost (issue 27): the doctor never writes into a folder it does not own unless asked, every output path
is checked before any work, a user's model that ends the interpreter is one line, a killed doctor resumes to the
uninterrupted result, and a second doctor on the same folder leaves it alone."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli, cli_subprocess, tiny_args
from fedgap.diagnose.outputs import check_out, foreign_files
from fedgap.errors import FedgapError
from fedgap.experiment.outputs import RunLock

HERE = Path(__file__).resolve().parent


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedgap: error:") and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# ----------------------------------------------------------------------------------------- --out ownership
def test_the_doctor_refuses_a_finished_run_folder_and_touches_nothing(tiny_idx, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli("run", *tiny_args(tiny_idx), "--out", str(run), "--quiet", capsys=capsys)[0] == 0
    before, summary = snapshot(run), (run / "summary.json").read_bytes()
    code, _, err = cli("doctor", *tiny_args(tiny_idx), "--out", str(run), capsys=capsys)
    line = one_error_line(err)
    assert code == 2 and "summary.json (a run's)" in line and "--overwrite" in line
    assert snapshot(run) == before and (run / "summary.json").read_bytes() == summary


def test_the_doctor_refuses_unrelated_files_and_accepts_its_own_folder(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(FedgapError, match=r"holds files a doctor did not write \(notes.txt\); .*--overwrite"):
        check_out(mine, overwrite=False)
    check_out(mine, overwrite=True)  # asked: the doctor writes beside them
    own = tmp_path / "own"
    (own / "runs" / "naive-s0-abc").mkdir(parents=True)
    for name in ("gap.csv", "gap.md", "report.html", "recommended.yaml", ".lock", "track.json",
                 ".gap.csv.tmp-123", ".write-probe-9"):  # a doctor's files and what a kill can leave behind
        (own / name).write_text("")
    (own / "summary.json").write_text('{"preset": "quick", "variants": []}')
    assert foreign_files(own) == [] and foreign_files(tmp_path / "new") == []
    check_out(own, overwrite=False)


# ----------------------------------------------------------------------------------------- output paths, models
def test_a_tensorboard_path_that_is_a_file_fails_before_the_run(tiny_idx, tmp_path, capsys):
    blocker = tmp_path / "tb"
    blocker.write_text("not a folder")
    out = tmp_path / "run"
    code, _, err = cli("run", *tiny_args(tiny_idx), f"track.tensorboard={blocker}", "--out", str(out), capsys=capsys)
    line = one_error_line(err)
    assert code == 2 and "track.tensorboard" in line and str(blocker) in line and not out.exists()


def test_a_plot_path_that_is_a_folder_fails_before_the_work(tmp_path, capsys):
    code, _, err = cli("partition", "--plot", str(tmp_path), capsys=capsys)
    assert code == 2 and "--plot" in one_error_line(err)


@pytest.mark.parametrize(("body", "message"), [
    ("import sys\nsys.exit(3)\n", "importing '{file}' failed: SystemExit: 3"),
    ("import os\nos._exit(3)\n", "importing '{file}' ended the Python process (exit code 3)"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", "importing '{file}' crashed the Python process "
                                                                  "(SIGSEGV)"),
])
def test_a_model_file_that_ends_the_interpreter_is_one_line(tiny_idx, tmp_path, body, message):
    model = tmp_path / "net.py"
    model.write_text(body + "def make(num_classes, in_channels, image_size):\n    return None\n")
    out = tmp_path / "run"
    done = cli_subprocess("run", *tiny_args(tiny_idx), f"model.name={model}:make", "--out", str(out), timeout=120)
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and message.format(file=model) in line, line
    assert not out.exists()


# ----------------------------------------------------------------------------------------- killed and resumed
def doctor_args(root: str, out: Path) -> list[str]:
    """A small quick doctor with two rungs (9 and 10 rounds) and a combination step of two pairs."""
    return [*tiny_args(root), "server.rounds=10", "--remedies", "fedbn,feddyn,logit_adjust", "--jobs", "2",
            "--quiet", "--out", str(out)]


def results(out: Path) -> tuple[list[dict], str]:
    """gap.csv without its timing column, and recommended.yaml."""
    rows = list(csv.DictReader(io.StringIO((out / "gap.csv").read_text())))
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows], (out / "recommended.yaml").read_text()


@pytest.fixture(scope="module")
def uninterrupted(tiny_idx, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "d"
    done = cli_subprocess("doctor", *doctor_args(tiny_idx, out), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return results(out)


@pytest.mark.parametrize("point", ["rung", "between-rungs", "combination", "outputs"])
def test_a_doctor_killed_at_any_point_resumes_to_the_uninterrupted_result(uninterrupted, tiny_idx, tmp_path, point):
    out = tmp_path / "d"
    killed = subprocess.run([sys.executable, str(HERE / "doctor_kill.py"), point, *doctor_args(tiny_idx, out)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "FEDGAP_NO_DOWNLOAD": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]  # it reached the point and died there
    time.sleep(1.0)  # its workers die with it (PR_SET_PDEATHSIG): every run folder can be locked again
    for folder in out.glob("runs/*"):
        RunLock(folder).release()
    resumed = cli_subprocess("doctor", *doctor_args(tiny_idx, out), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert results(out) == uninterrupted


def test_a_second_doctor_on_the_same_folder_says_so_and_touches_nothing(tiny_idx, tmp_path):
    out = tmp_path / "d"
    args = [sys.executable, "-m", "fedgap", "doctor", *doctor_args(tiny_idx, out)]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "FEDGAP_NO_DOWNLOAD": "1"})
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("runs/*")):  # the first doctor holds the folder and has started its runs
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        top = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "runs"}
        second = cli_subprocess("doctor", *doctor_args(tiny_idx, out), timeout=120)
        line = one_error_line(second.stderr)
        assert second.returncode == 2 and "another fedgap process is working in this folder" in line
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "runs"} == top
    finally:
        first.kill()
        first.wait()
