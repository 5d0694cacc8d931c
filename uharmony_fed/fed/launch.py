"""The three ways to run a federation: simulate, server (coordinator) and client (site)."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from uharmony_fed.checkpoint import atomic_write_bytes
from uharmony_fed.fedconfig import FedConfig, config_to_dict
from uharmony_fed.fed.runtime import (
    Managed,
    Tls,
    flower_bin,
    flower_env,
    flwr_run,
    free_port,
    managed,
    start_superlink,
    start_supernode,
    strip_colors,
    write_flower_home,
)


def default_run_dir(cfg: FedConfig) -> Path:
    """``runs/<name>-<timestamp>`` under the current directory."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{stamp}"


def prepare_run_dir(cfg: FedConfig, run_dir: Path | None, resume: bool) -> Path:
    """Create the run folder and write the resolved config the ServerApp will read.

    Raises:
        FileNotFoundError: ``resume`` without an existing run folder.
    """
    if resume and (run_dir is None or not Path(run_dir).is_dir()):
        msg = f"--resume needs --run-dir pointing at an existing run folder, got {run_dir}"
        raise FileNotFoundError(msg)
    run_dir = Path(run_dir or default_run_dir(cfg)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "fed.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())
    return run_dir


def ensure_demo(cfg: FedConfig) -> None:
    """Generate the demo federation when the config asks for it and it is missing.

    Raises:
        FileNotFoundError: a site's site.yaml is missing and the config has no demo.
    """
    missing = [s for s in cfg.sites if not cfg.site_config_path(s).is_file()]
    if not missing:
        return
    if cfg.demo is None:
        listed = ", ".join(str(cfg.site_config_path(s)) for s in missing)
        msg = f"site configs not found: {listed}; fix data_root/sites in the config"
        raise FileNotFoundError(msg)
    from uharmony_fed.demo import make_demo

    print(f"demo federation not found under {cfg.data_root}; generating it "
          f"({cfg.demo.sites} sites x {cfg.demo.cases} cases)", flush=True)
    make_demo(cfg.data_root, sites=cfg.demo.sites, cases=cfg.demo.cases, seed=cfg.demo.seed)
    still = [s for s in cfg.sites if not cfg.site_config_path(s).is_file()]
    if still:
        msg = f"the demo generator made no site named {still}; set sites in the config to its names"
        raise FileNotFoundError(msg)


def run_config(cfg: FedConfig, run_dir: Path, resume: bool, audit_dir: Path | None = None,
               simulation: bool = False) -> dict:
    """The Flower run config: where the ServerApp finds fed.yaml and the run folder.

    ``audit_dir`` (simulation only) makes every virtual site log what it sends there.
    Only simulated sites, which share this machine's cores, are limited in threads.
    """
    return {"config-path": str(run_dir / "fed.yaml"), "run-dir": str(run_dir), "resume": resume,
            "sites": ",".join(cfg.sites), "data-root": str(cfg.data_root),
            "threads-per-site": cfg.simulation.threads_per_site if simulation else 0,
            "progress": False,
            "audit-dir": str(audit_dir or "")}


@dataclass
class RunResult:
    """What a finished run left behind."""

    run_dir: Path
    returncode: int
    seconds: float


def simulate(cfg: FedConfig, run_dir: Path | None = None, resume: bool = False,
             echo: bool = True, timeout: float | None = None, audit_dir: Path | None = None,
             on_started: Callable[[Managed], None] | None = None) -> RunResult:
    """Run the federation on Flower's simulation engine, one virtual site per configured site.

    Starts a private SuperLink in simulation mode on a free loopback port, submits the app
    with ``flwr run``, streams its progress, and stops every process it started.
    """
    ensure_demo(cfg)
    run_dir = prepare_run_dir(cfg, run_dir, resume)
    home = run_dir / ".flwr"
    port = free_port()
    start = time.perf_counter()
    link = start_superlink("127.0.0.1", port, run_dir / "logs" / "superlink.log", simulation=True,
                           env={"FLWR_HOME": str(home)})
    with managed(link):
        if on_started is not None:
            on_started(link)
        write_flower_home(home, "sim", f"127.0.0.1:{port}", ca_cert=None)
        sim = cfg.simulation
        fed_cfg = {"num-supernodes": len(cfg.sites),
                   "client-resources-num-cpus": _num(sim.cpus_per_site),
                   "client-resources-num-gpus": _num(sim.gpus_per_site)}
        rc = flwr_run(home, "sim", run_config(cfg, run_dir, resume, audit_dir, simulation=True),
                      run_dir / "logs" / "flwr_run.log",
                      federation_config=fed_cfg, echo=echo, timeout=timeout)
    return RunResult(run_dir, rc, time.perf_counter() - start)


def _num(x: float) -> int | float:
    # Flower's simulation config takes whole CPU/GPU counts as integers.
    return int(x) if float(x).is_integer() else x


def tls_files(cfg: FedConfig, insecure: bool) -> Tls | None:
    """The server's TLS files from ``server.certs_dir``, or None with ``--insecure``.

    Raises:
        FileNotFoundError: TLS is on and a file is missing (with the command that makes it).
    """
    if insecure:
        return None
    d = cfg.server.certs_dir
    tls = Tls(d / "ca.crt", d / "server.pem", d / "server.key")
    for path in (tls.ca_cert, tls.server_cert, tls.server_key):
        if not path.is_file():
            msg = (f"{path} not found: TLS is on by default. Make development certificates with "
                   f"'uharmony-fed certs --out {d}', point server.certs_dir at your PKI's files, "
                   "or pass --insecure for a local trial")
            raise FileNotFoundError(msg)
    return tls


def enroll_sites(home: Path, connection: str, keys_dir: Path) -> list[str]:
    """Register every ``*.key.pub`` in ``keys_dir`` with the running SuperLink."""
    enrolled = []
    for pub in sorted(keys_dir.glob("*.key.pub")):
        proc = subprocess.run([flower_bin("flwr"), "supernode", "register", str(pub), connection],
                              env={**flower_env(), "FLWR_HOME": str(home)}, capture_output=True, text=True,
                              timeout=60)
        said = f"{proc.stdout.strip()} {proc.stderr.strip()}"
        if proc.returncode != 0 and "already" not in said.lower():
            msg = f"enrolling {pub} failed: {said}"
            raise RuntimeError(msg)
        enrolled.append(pub.name.removesuffix(".key.pub"))
    return enrolled


def serve(cfg: FedConfig, run_dir: Path | None = None, resume: bool = False, insecure: bool = False,
          echo: bool = True, timeout: float | None = None,
          on_started: Callable[[Managed], None] | None = None) -> RunResult:
    """The coordinator: a SuperLink on the configured address, then the federation's run.

    TLS is on unless ``insecure``; with TLS and ``server.supernode_auth``, only the sites
    whose public keys are in ``<certs_dir>/sites`` are accepted.
    """
    tls = tls_files(cfg, insecure)
    auth = tls is not None and cfg.server.supernode_auth
    run_dir = prepare_run_dir(cfg, run_dir, resume)
    home = run_dir / ".flwr"
    start = time.perf_counter()
    # SuperLink's database keeps the enrolled sites and their node ids across a restart of
    # the coordinator, so connected SuperNodes carry on instead of being forgotten.
    link = start_superlink(cfg.server.host, cfg.server.port, run_dir / "logs" / "superlink.log",
                           tls=tls, supernode_auth=auth, database=run_dir / "superlink.db",
                           env={"FLWR_HOME": str(home)})
    with managed(link):
        local = "127.0.0.1" if cfg.server.host in ("0.0.0.0", "") else cfg.server.host
        write_flower_home(home, "server", f"{local}:{cfg.server.port}",
                          ca_cert=None if tls is None else tls.ca_cert)
        if auth:
            names = enroll_sites(home, "server", cfg.server.certs_dir / "sites")
            print(f"enrolled sites: {', '.join(names) if names else 'none (no site will be accepted)'}",
                  flush=True)
        if on_started is not None:
            on_started(link)
        print(f"SuperLink listening on {cfg.server.host}:{cfg.server.port} "
              f"({'TLS' if tls else 'INSECURE'}{', site keys required' if auth else ''}); "
              f"run folder {run_dir}", flush=True)
        rc = flwr_run(home, "server", run_config(cfg, run_dir, resume), run_dir / "logs" / "flwr_run.log",
                      echo=echo, timeout=timeout)
    return RunResult(run_dir, rc, time.perf_counter() - start)


def site_node_config(site: str, site_config: Path, audit_log: Path | None = None,
                     threads: int = 0) -> dict[str, str | int]:
    """The SuperNode's node config: the site's identity, its site.yaml, and its CPU threads.

    ``threads`` > 0 caps PyTorch's CPU threads; several sites sharing one machine need it,
    since oversubscribed threads slow training several times over.
    """
    conf: dict[str, str | int] = {"site": site, "site-config": str(Path(site_config).resolve())}
    if audit_log is not None:
        conf["audit-log"] = str(Path(audit_log).resolve())
    if threads > 0:
        conf["threads"] = threads
    return conf


_REFUSED = re.compile(r"(Failed to activate SuperNode|code: 2004|PERMISSION_DENIED|UNAUTHENTICATED"
                      r"|not authorized|certificate verify failed|CERTIFICATE_VERIFY_FAILED)",
                      re.IGNORECASE)


def run_site(site: str, site_config: Path, superlink: str, *, ca_cert: Path | None, key: Path | None,
             port: int = 0, log_path: Path | None = None, audit_log: Path | None = None,
             refusals: int = 4, threads: int = 0) -> int:
    """A hospital's SuperNode, in the foreground until stopped (Ctrl-C).

    While the server is not up, Flower's SuperNode reconnects with backoff by itself. If
    the server refuses the site (its key is not enrolled yet, or the CA does not match),
    SuperNode exits; the site then says so in one clear line and tries again with a
    growing pause, ``refusals`` times, before giving up with exit code 1.

    Returns:
        The exit code: 0 when stopped by the operator, 1 when refused.
    """
    if not Path(site_config).is_file():
        msg = f"{site_config} not found; pass --site-config with the site's site.yaml"
        raise FileNotFoundError(msg)
    if log_path is None:
        from uharmony_fed.data import load_site_config

        log_path = Path(load_site_config(site_config).state_dir) / "logs" / "supernode.log"
    conf = site_node_config(site, site_config, audit_log, threads)
    for attempt in range(refusals + 1):
        node: Managed = start_supernode(superlink, port or free_port(), conf, log_path,
                                        ca_cert=ca_cert, auth_key=key)
        print(f"site {site}: SuperNode started, connecting to {superlink} "
              f"({'TLS' if ca_cert else 'INSECURE'}); log {log_path}", flush=True)
        refused = None
        with managed(node):
            offset = log_path.stat().st_size if log_path.exists() else 0
            try:
                while node.proc.poll() is None:
                    time.sleep(1.0)
                    with open(log_path, errors="replace") as fh:
                        fh.seek(offset)
                        new = fh.read()
                        offset = fh.tell()
                    for line in new.splitlines():
                        if _REFUSED.search(line):
                            refused = strip_colors(line).strip()
                        elif "Receiving: " in line or "Sending: " in line:
                            print(f"site {site}: {strip_colors(line).strip()}", flush=True)
            except KeyboardInterrupt:
                return 0
        if refused is None:
            return node.proc.returncode or 0
        pause = min(5 * 2**attempt, 60)
        print(f"site {site}: the server at {superlink} refused this site ({refused}).\n"
              "  Check that the coordinator enrolled this site's public key "
              f"(<certs_dir>/sites/{site}.key.pub) and that --ca is the CA that signed the "
              "server's certificate." + (f" Trying again in {pause} s." if attempt < refusals else ""),
              file=sys.stderr, flush=True)
        if attempt < refusals:
            time.sleep(pause)
    return 1
