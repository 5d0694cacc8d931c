"""Start and stop Flower's own processes: SuperLink, SuperNode and ``flwr run``.

Nothing here reimplements Flower: these are its command-line programs, started with the
flags of Flower 1.42 (one HTTP(S) port per SuperLink, one local port per SuperNode, no
runtime dependency installation) in their own process group, so that stopping one also
stops the ServerApp, ClientApp and simulation processes it spawned.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

import psutil
import tomli_w

#: The Flower App folder (pyproject.toml only; the code is the installed package).
APP_DIR = Path(str(resources.files("uharmony_fed.fed") / "app"))


def flower_bin(name: str) -> str:
    """Path of a Flower console script of this Python environment."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        msg = f"{name} not found; install uharmony-fed with its dependencies (pip install .)"
        raise FileNotFoundError(msg)
    return found


def flower_env() -> dict[str, str]:
    """The environment for Flower's programs: this Python's scripts first on PATH.

    SuperLink and SuperNode start helpers (``flower-superexec``, ``flwr-serverapp``) by
    name, so they must find this environment's copies even when it is not activated.
    """
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {**os.environ, "PATH": f"{bindir}{os.pathsep}{path}", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1"}


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on ``host`` (for tests and simulations)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until ``host:port`` accepts connections.

    Raises:
        TimeoutError: nothing listened within ``timeout`` seconds.
        RuntimeError: ``proc`` exited before the port opened.
    """
    deadline = time.monotonic() + timeout
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else host
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            msg = f"process exited with code {proc.returncode} before {host}:{port} opened"
            raise RuntimeError(msg)
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((probe, port)) == 0:
                return
        time.sleep(0.2)
    msg = f"nothing listens on {host}:{port} after {timeout:.0f} s"
    raise TimeoutError(msg)


@dataclass
class Managed:
    """A started Flower process, its log file, and how to stop it."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    def _tree(self) -> list[psutil.Process]:
        # Flower detaches some children into sessions of their own (SuperExec), so the
        # process group alone does not reach them; the process tree does.
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process and all its descendants, SIGKILL what is left after ``timeout``."""
        _, alive = psutil.wait_procs(_signal(self._tree(), "terminate"), timeout=timeout)
        psutil.wait_procs(_signal(alive, "kill"), timeout=5)
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL the process and all its descendants at once (used by fault tests)."""
        psutil.wait_procs(_signal(self._tree(), "kill"), timeout=10)
        self.proc.wait(timeout=10)


def _signal(procs: list[psutil.Process], how: str) -> list[psutil.Process]:
    """Call ``terminate`` or ``kill`` on each process that still exists; return them all."""
    for p in procs:
        try:
            getattr(p, how)()
        except psutil.NoSuchProcess:
            pass
    return procs


def _spawn(name: str, cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None) -> Managed:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    full_env = {**flower_env(), **(env or {})}
    proc = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=full_env,
                            start_new_session=True)
    fh.close()
    return Managed(name, proc, log_path)


@dataclass(frozen=True)
class Tls:
    """TLS files: the CA every side trusts, and the server's certificate and key."""

    ca_cert: Path
    server_cert: Path | None = None
    server_key: Path | None = None


def superlink_command(host: str, port: int, *, tls: Tls | None, simulation: bool = False,
                      supernode_auth: bool = False, database: Path | None = None) -> list[str]:
    """The ``flower-superlink`` command line for these settings."""
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation", "--isolation", "subprocess"]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                "--ssl-keyfile", str(tls.server_key)]
    if simulation:
        cmd.append("--simulation")
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def start_superlink(host: str, port: int, log_path: Path, *, tls: Tls | None = None,
                    simulation: bool = False, supernode_auth: bool = False,
                    database: Path | None = None, env: Mapping[str, str] | None = None,
                    timeout: float = 60.0) -> Managed:
    """Start a SuperLink and wait until its port is open."""
    cmd = superlink_command(host, port, tls=tls, simulation=simulation,
                            supernode_auth=supernode_auth, database=database)
    link = _spawn("superlink", cmd, log_path, env)
    try:
        wait_for_port(host, port, timeout, link.proc)
    except (TimeoutError, RuntimeError) as exc:
        link.stop()
        tail = log_path.read_text(errors="replace")[-2000:]
        msg = f"SuperLink did not start ({exc}); its log {log_path} ends with:\n{tail}"
        raise RuntimeError(msg) from exc
    return link


def start_supernode(superlink: str, port: int, node_config: Mapping[str, str], log_path: Path, *,
                    ca_cert: Path | None = None, auth_key: Path | None = None,
                    max_retries: int | None = None, max_wait_time: float | None = None,
                    env: Mapping[str, str] | None = None) -> Managed:
    """Start a SuperNode (a site) that connects to ``superlink`` (HOST:PORT).

    SuperNode retries with backoff by itself while the SuperLink is not up; the
    ``max_retries``/``max_wait_time`` bound how long.
    """
    conf = " ".join(f"{k}={_toml_str(v)}" for k, v in node_config.items())
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink, "--host", "127.0.0.1",
           "--port", str(port), "--node-config", conf, "--isolation", "subprocess"]
    cmd += ["--insecure"] if ca_cert is None else ["--root-certificates", str(ca_cert)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    return _spawn("supernode", cmd, log_path, env)


def _toml_str(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return "'" + str(value).replace("'", "") + "'"


def write_flower_home(home: Path, name: str, address: str, *, ca_cert: Path | None) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection named ``name``.

    Flower 1.42 reads connections from this file, not from the app's pyproject, and a
    product-owned FLWR_HOME leaves the user's ``~/.flwr`` untouched.
    """
    conn: dict[str, object] = {"address": address}
    if ca_cert is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(ca_cert)
    home.mkdir(parents=True, exist_ok=True)
    data = {"superlink": {"default": name, name: conn}}
    (home / "config.toml").write_text(tomli_w.dumps(data))


def flwr_run(home: Path, connection: str, run_config: Mapping[str, object], log_path: Path, *,
             federation_config: Mapping[str, object] | None = None, echo: bool = True,
             timeout: float | None = None) -> int:
    """Submit the app with ``flwr run ... --stream`` and stream its logs until it ends.

    Returns:
        The exit code of ``flwr run``.
    """
    rc_file = log_path.with_name("flower_run_config.toml")
    rc_file.write_text(tomli_w.dumps(dict(run_config)))
    cmd = [flower_bin("flwr"), "run", str(APP_DIR), connection, "--run-config", str(rc_file), "--stream"]
    if federation_config:
        cmd += ["--federation-config", " ".join(f"{k}={_toml_str(v)}" for k, v in federation_config.items())]
    env = {**flower_env(), "FLWR_HOME": str(home)}
    with open(log_path, "ab") as log_fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        assert proc.stdout is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for line in proc.stdout:
                log_fh.write(line)
                if echo:
                    sys.stdout.write(strip_colors(line.decode(errors="replace")))
                    sys.stdout.flush()
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"flwr run exceeded {timeout} s")
            return proc.wait()
        finally:
            if proc.poll() is None:
                Managed("flwr run", proc, log_path).stop()


def strip_colors(line: str) -> str:
    # Flower colours its log levels; keep the text readable in files and pipes.
    for code in ("\x1b[92m", "\x1b[93m", "\x1b[91m", "\x1b[0m", "\x1b[94m", "\x1b[1m"):
        line = line.replace(code, "")
    return line


@contextmanager
def managed(*procs: Managed) -> Iterator[None]:
    """Stop every given process on exit, whatever happened."""
    try:
        yield
    finally:
        for p in reversed(procs):
            p.stop()
