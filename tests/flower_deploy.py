"""A real Flower deployment (flwr 1.42) on loopback, for tests: one ``flower-superlink``, N ``flower-supernode``
processes and the ``flwr`` CLI, each its own process as a user would start them.

Everything listens on 127.0.0.1 on ports chosen free at run time (the SuperLink serves its Fleet, Control and
Runtime HTTP APIs on one port; each SuperNode serves its Runtime API for its ClientApps on one port). Each
process has its own Flower home (``FLWR_HOME``) under the deployment's folder, Flower's telemetry and update
check are off, and the SuperLink does not install app dependencies (fedgap and flwr are in this environment;
the SuperLink and SuperNodes start ``flower-superexec`` from PATH, so this environment's bin folder goes first).

``Deployment.stop`` ends every process it started and everything they started (SuperExec, ServerApp and
ClientApp processes, some in sessions of their own): SIGTERM, then SIGKILL after a grace period, then it
checks from /proc that none is left and nothing listens.

TLS and SuperNode authentication as Flower 1.42 does them: the SuperLink gets ``--ssl-ca-certfile``,
``--ssl-certfile``, ``--ssl-keyfile`` (one certificate for all its APIs) and ``--enable-supernode-auth``; a
SuperNode gets ``--root-certificates CA`` and ``--auth-supernode-private-key KEY`` (an EC key in OpenSSH
format); its public key is registered with ``flwr supernode register KEY.pub CONNECTION`` before it connects.
Certificates and keys are made here with ``cryptography`` (a dependency of flwr).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from procs import alive, descendants, identity, listening_sockets

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flower-superexec, flwr
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on loopback now (the kernel's choice); the process that binds it next gets it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FEDGAP_NO_DOWNLOAD": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------------------------------- certificates
@dataclass(frozen=True)
class Tls:
    ca: Path  # the CA certificate: SuperNodes and the flwr CLI verify the SuperLink with it
    cert: Path  # the SuperLink's certificate (for 127.0.0.1 and localhost), signed by the CA
    key: Path  # its private key


def make_tls(folder: Path) -> Tls:
    """A CA and a SuperLink certificate for 127.0.0.1 signed by it, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    hour = datetime.timedelta(hours=1)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - hour).not_valid_after(now + 24 * hour)
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = (builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("fedgap test CA", ca_key, "fedgap test CA", ca_key, ca=True)
    server_cert = cert("fedgap test SuperLink", server_key, "fedgap test CA", ca_key, ca=False)
    tls = Tls(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    tls.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    tls.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    tls.key.write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    return tls


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (EC P-384, OpenSSH format, as ``ssh-keygen -t ecdsa -b 384``
    writes): (private key file, public key file)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


# ------------------------------------------------------------------------------------------- processes
def signal_process(ident: tuple[int, int], sig: int) -> None:
    """Signal the process ``ident`` names, only if that pid still belongs to it."""
    if alive(ident):
        try:
            os.kill(ident[0], sig)
        except ProcessLookupError:
            pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Deployment:
    """One SuperLink and its SuperNodes under ``root``; the ``flwr`` CLI talks to it through the SuperLink
    connection named ``connection`` in the CLI's own Flower home. Use as a context manager (``stop`` on exit)."""

    def __init__(self, root: Path, *, tls: Tls | None = None, node_auth: bool = False, port: int | None = None,
                 connection: str = "fedgap-test"):
        self.root, self.tls, self.node_auth, self.connection = root, tls, node_auth, connection
        self.port = port or free_port()
        self.address = f"{HOST}:{self.port}"
        self.procs: list[Proc] = []
        self.seen: set[tuple[int, int]] = set()  # every process found in the tree, as procs.identity
        self.cli_home = root / "home-cli"
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.write_connection()

    # -------------------------------------------------------------------------------- set-up
    def write_connection(self, entry: str | None = None) -> None:
        """The flwr CLI's config.toml: the SuperLink connection ``self.connection`` (or ``entry``, a TOML
        ``[superlink.NAME]`` table as `fedgap export flower` writes it), as the default."""
        if entry is None:
            security = f'root-certificates = "{self.tls.ca}"' if self.tls else "insecure = true"
            entry = f'[superlink.{self.connection}]\naddress = "{self.address}"\n{security}\n'
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(f'[superlink]\ndefault = "{self.connection}"\n\n{entry}')

    def spawn(self, name: str, args: list[str]) -> Proc:
        home = self.root / f"home-{name}"
        home.mkdir(exist_ok=True)
        log = self.root / "logs" / f"{name}.log"
        with open(log, "wb") as out:
            # its own session: a Ctrl-C meant for pytest does not reach it; stop() ends it and everything below it
            popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=flower_env(home), cwd=home, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def start_superlink(self) -> Proc:
        """Start the SuperLink and wait until it listens (on another free port if its port was taken meanwhile)."""
        def args() -> list[str]:
            args = [str(BIN / "flower-superlink"), "--host", HOST, "--port", str(self.port),
                    "--disable-runtime-dependency-installation"]
            if self.tls:
                args += ["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert),
                         "--ssl-keyfile", str(self.tls.key)]
            else:
                args += ["--insecure"]
            return args + (["--enable-supernode-auth"] if self.node_auth else [])

        def new_port() -> list[str]:
            self.port = free_port()
            self.address = f"{HOST}:{self.port}"
            self.write_connection()
            return args()

        return self.start_listening("superlink", args(), lambda: self.port, new_port)

    def start_supernode(self, partition_id: int, num_partitions: int, *, name: str | None = None,
                        key: Path | None = None, root_certificates: Path | None | bool = True,
                        max_wait_seconds: float | None = None) -> Proc:
        """A SuperNode holding fedgap client ``partition_id``. ``root_certificates``: True = the deployment's
        CA (when it has TLS), False = none (the system's trust store), or a path."""
        if root_certificates is True:
            root_certificates = self.tls.ca if self.tls else None
        port = free_port()

        def args() -> list[str]:
            args = [str(BIN / "flower-supernode"), "--superlink", self.address, "--host", HOST, "--port", str(port),
                    "--node-config", f"partition-id={partition_id} num-partitions={num_partitions}"]
            if self.tls is None:
                args += ["--insecure"]
            elif root_certificates:
                args += ["--root-certificates", str(root_certificates)]
            if key is not None:
                args += ["--auth-supernode-private-key", str(key)]
            if max_wait_seconds is not None:
                args += ["--max-wait-time", str(max_wait_seconds)]
            return args

        def new_port() -> list[str]:
            nonlocal port
            port = free_port()
            return args()

        # its Runtime API (for its ClientApps) listens before it connects to the SuperLink
        return self.start_listening(name or f"supernode-{partition_id}", args(), lambda: port, new_port)

    def start_listening(self, name: str, args: list[str], port, new_port, timeout: float = 60) -> Proc:
        """Start a process and wait until it listens on ``port()``; if the port was taken between free_port() and
        the process binding it (another process's connection got it), try again with ``new_port()``'s args."""
        for _ in range(3):
            proc = self.spawn(name, args)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.popen.poll() is None:
                # held by this process (a connect() could reach whoever else holds the port)
                if port() in {p for _, p in listening_sockets({proc.popen.pid})}:
                    return proc
                time.sleep(0.2)
            if proc.popen.poll() is None:
                raise TimeoutError(f"{name} did not listen on {HOST}:{port()} within {timeout:g} s:\n{proc.tail()}")
            if "address already in use" not in proc.tail(200).lower():
                raise RuntimeError(f"{name} exited with {proc.popen.returncode}:\n{proc.tail()}")
            self.procs.remove(proc)
            args = new_port()
        raise RuntimeError(f"{name}: no free port after 3 tries:\n{proc.tail()}")

    # -------------------------------------------------------------------------------- the flwr CLI
    def flwr(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, timeout=timeout,
                              env={**flower_env(self.cli_home), "COLUMNS": "200"}, cwd=self.root)
        if check and done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def flwr_json(self, *args: str, **kwargs) -> dict:
        done = self.flwr(*args, "--format", "json", **kwargs)
        return json.loads(done.stdout[done.stdout.index("{"):])

    def register(self, public_key: Path) -> int:
        """``flwr supernode register``: the SuperLink will accept the SuperNode holding this key's private half."""
        return int(self.flwr_json("supernode", "register", str(public_key), self.connection)["node-id"])

    def supernodes(self) -> list[dict]:
        """``flwr supernode ls``: the SuperNodes the SuperLink knows, with their status."""
        return self.flwr_json("supernode", "ls", self.connection)["nodes"]

    def submit(self, app: Path, run_config: dict[str, str | int | float]) -> int:
        """``flwr run APP CONNECTION --run-config ...``; returns the run id."""
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        return int(self.flwr_json("run", str(app), self.connection, "--run-config", overrides)["run-id"])

    def run_status(self, run_id: int) -> dict:
        return self.flwr_json("ls", self.connection, "--run-id", str(run_id))["runs"][0]

    def wait_finished(self, run_ids: list[int], timeout: float) -> dict[int, dict]:
        """Poll ``flwr ls`` until every run is finished (status ``finished:...``); a hard timeout."""
        deadline = time.monotonic() + timeout
        done: dict[int, dict] = {}
        while True:
            for run_id in run_ids:
                if run_id not in done and (status := self.run_status(run_id))["status"].startswith("finished"):
                    done[run_id] = status
            if len(done) == len(run_ids):
                return done
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"runs {sorted(set(run_ids) - set(done))} not finished within {timeout:g} s\n"
                                   + self.logs())
            time.sleep(2)

    def run_log(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), self.connection, "--show", check=False).stdout

    # -------------------------------------------------------------------------------- state and teardown
    def check_alive(self) -> None:
        superlink = self.procs[0]
        if superlink.popen.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with {superlink.popen.returncode}:\n{superlink.tail()}")

    def tree(self, roots: list[Proc] | None = None) -> set[tuple[int, int]]:
        """The live processes started here and everything below them now, as ``identity`` (pid, start time);
        remembered in ``self.seen`` so that stop() finds SuperExecs whose parent has gone."""
        found = set()
        for proc in self.procs if roots is None else roots:
            for pid in {proc.popen.pid, *descendants(proc.popen.pid)}:
                if (ident := identity(pid)) is not None and alive(ident):
                    found.add(ident)
        self.seen |= found
        return found

    def listening(self) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
        return listening_sockets({pid for pid, _ in self.tree()})

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        """Signal a process and every process below it (a SuperNode lost with its SuperExec and ClientApps)."""
        for ident in self.tree([proc]):
            signal_process(ident, sig)
        try:
            proc.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def logs(self, lines: int = 25) -> str:
        return "\n".join(f"--- {p.name} (exit {p.popen.poll()}):\n{p.tail(lines)}" for p in self.procs)

    def stop(self, grace: float = 10.0) -> None:
        """End every process of the deployment: SIGTERM to the started ones (the SuperLink and SuperNodes stop
        their SuperExec and apps), SIGKILL to whatever of the tree is left after ``grace`` seconds; reap."""
        self.tree()
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.leftovers():
            self.tree()
            for proc in self.procs:
                proc.popen.poll()  # reap
            time.sleep(0.2)
        for ident in self.leftovers():
            signal_process(ident, signal.SIGKILL)
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def leftovers(self) -> list[tuple[int, int]]:
        """Processes of this deployment still running (after ``stop``: none)."""
        self.seen |= {i for p in self.procs if (i := identity(p.popen.pid)) is not None}
        return sorted(i for i in self.seen if alive(i))

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
