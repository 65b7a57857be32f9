"""Every bad input exits with code 2 and one line naming the key or file; no traceback; no finished-looking
output left behind."""

import shutil

import pytest

from conftest import REPO, cli, cli_subprocess


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["client.lrr=0.1"], "unknown config key 'client.lrr'"),
        (["data.partition=bogus"], "data.partition: must be one of"),
        (["client.lr=0"], "client.lr: input should be greater than 0"),
        (["server.clients_per_round=101"], "server.clients_per_round: must be <= data.num_clients (100)"),
        (["model.norm=group", "model.groups=3"], "model.groups: 3 does not divide"),
        (["engine.name=warp"], "engine.name: must be one of"),
        (["client.lr=inf"], "client.lr: input should be a finite number"),
        (["server.mu=nan"], "server.mu: input should be a finite number"),
        (["server.average=-1"], "server.average: input should be greater than or equal to 0"),
        (["data.alpha=.inf"], "data.alpha: input should be a finite number"),
        (["engine.fail_clients=[1000]"], "engine.fail_clients: client ids must be in 0..99"),
        (["engine.crash_clients=[-1]"], "engine.crash_clients: client ids must be in 0..99"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code, stdout, err = cli("run", *args, "--out", str(out), capsys=capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("fedgap: error:")
    assert "Traceback" not in err
    assert not out.exists()


def test_data_file_errors(tmp_path, capsys):
    root = tmp_path / "mnist"
    root.mkdir()
    code, _, err = cli("run", f"data.root={root}", "--out", str(tmp_path / "o1"), capsys=capsys)
    assert code == 2 and "train-images-idx3-ubyte[.gz]': not found" in err and len(err.strip().splitlines()) == 1
    for f in (REPO / "data" / "mnist").glob("*.gz"):
        shutil.copy(f, root / f.name)
    victim = root / "t10k-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    code, _, err = cli("run", f"data.root={root}", "--out", str(tmp_path / "o2"), capsys=capsys)
    assert code == 2 and "t10k-images-idx3-ubyte.gz': truncated or corrupted" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    code, _, err = cli("run", "data.name=idx", f"data.root={tmp_path / 'nowhere'}", capsys=capsys)
    assert code == 2 and "not a folder" in err


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = cli("run", "--out", str(blocker), capsys=capsys)
    assert code == 2 and "exists and is not a folder" in err
    code, _, err = cli("run", "--out", str(blocker / "sub"), capsys=capsys)
    assert code == 2 and "not writable" in err
    code, _, err = cli("run", "--out", "/proc/fedgap-cannot-write-here", capsys=capsys)
    assert code == 2 and "not writable" in err


def test_real_process_exit_code_and_help():
    bad = cli_subprocess("run", "client.optimizer=lbfgs")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "fedgap: error: client.optimizer: must be one of 'sgd', 'adam' or 'adamw', got 'lbfgs'"]
    for command in ([], ["run"], ["partition"], ["keys"]):
        shown = cli_subprocess(*command, "--help")
        assert shown.returncode == 0 and "Usage:" in shown.stdout
