"""Helpers for tests that run a real TLS deployment on 127.0.0.1 (SuperLink + SuperNodes)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml

from uharmony_fed.certs import make_certs
from uharmony_fed.fed.launch import site_node_config
from uharmony_fed.fed.runtime import Managed, free_port, start_supernode
from uharmony_fed.fedconfig import FedConfig, config_to_dict

SITES = ("hospitalA", "hospitalB", "hospitalC")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``predicate`` until it holds; fail if ``proc`` (the server) exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_server(cfg_path: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    """Start ``uharmony-fed server`` and wait until it has enrolled the site keys."""
    cmd = [sys.executable, "-m", "uharmony_fed.cli", "server", "--config", str(cfg_path),
           "--run-dir", str(run_dir), *extra]
    log_path = run_dir.parent / f"server-{int(time.time() * 1000)}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: "enrolled sites" in log_path.read_text(errors="replace"), 90,
             "the server to enrol the sites", proc)
    return proc


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started."""
    Managed("server", proc, Path("/dev/null")).kill()


class Loopback:
    """``cfg`` deployed with TLS and site keys on a free 127.0.0.1 port.

    Writes the certificates, site keys and ``fed.yaml`` into ``tmp_path``; names the
    federation ``<prefix><port>`` so runs never share site state; starts sites on demand
    (logs in ``tmp_path/<site>.log``, payload audit in ``tmp_path/audit-<site>.jsonl`` when
    ``audit``) and stops them all in :meth:`stop`. Keys are enrolled for ``sites``, which
    may include sites the config does not list.
    """

    def __init__(self, cfg: FedConfig, tmp_path: Path, prefix: str, audit: bool = False,
                 sites: tuple[str, ...] = SITES) -> None:
        self.tmp_path = tmp_path
        self.certs = tmp_path / "certs"
        make_certs(self.certs, hosts=("localhost", "127.0.0.1"), sites=sites)
        self.port = free_port()
        self.cfg = replace(cfg, name=f"{prefix}{self.port}",
                           server=replace(cfg.server, host="127.0.0.1", port=self.port, certs_dir=self.certs))
        self.cfg_path = tmp_path / "fed.yaml"
        self.cfg_path.write_text(yaml.safe_dump(config_to_dict(self.cfg)))
        self.audit = audit
        self.nodes: list[Managed] = []

    def start_site(self, site: str) -> Managed:
        audit_log = self.tmp_path / f"audit-{site}.jsonl" if self.audit else None
        node = start_supernode(f"127.0.0.1:{self.port}", free_port(),
                               site_node_config(site, self.cfg.data_root / site / "site.yaml", audit_log),
                               self.tmp_path / f"{site}.log", ca_cert=self.certs / "ca.crt",
                               auth_key=self.certs / "sites" / f"{site}.key")
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
