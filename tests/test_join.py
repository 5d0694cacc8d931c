"""A hospital joins a running federation: it trains from the next round with its own fresh local part.

Loopback deployment (TLS, site keys) as in test_federation.py: Flower's own SuperLink and
SuperNodes on 127.0.0.1, bounded timeouts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from uharmony_fed.certs import make_certs
from uharmony_fed.checkpoint import checkpoint_path, load_payload
from uharmony_fed.demo import make_demo
from uharmony_fed.fed.launch import site_node_config
from uharmony_fed.fed.runtime import Managed, free_port, start_supernode
from uharmony_fed.fedconfig import FedConfig, config_to_dict, load_config
from uharmony_fed.model import build_model
from uharmony_fed.policy import get_policy, split_keys

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SITES = ("hospitalA", "hospitalB", "hospitalC")


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("join_data")
    make_demo(root, sites=3, cases=3, seed=0, spacing_mm=6.0, log=None)
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _server(cfg_path: Path, run_dir: Path) -> subprocess.Popen:
    """Start ``uharmony-fed server`` and wait until it has enrolled the site keys."""
    cmd = [sys.executable, "-m", "uharmony_fed.cli", "server", "--config", str(cfg_path), "--run-dir", str(run_dir)]
    log_path = run_dir.parent / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for(lambda: "enrolled sites" in log_path.read_text(errors="replace"), 90,
              "the server to enrol the sites", proc)
    return proc


@pytest.fixture
def deployment(smoke_root: Path, tmp_path: Path):
    """A 3-round TLS + site-key deployment config on a free loopback port, and a site launcher."""
    certs = tmp_path / "certs"
    make_certs(certs, hosts=("localhost", "127.0.0.1"), sites=SITES)
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    port = free_port()
    # 6 mm voxels keep each round a few seconds of CPU, even on a busy machine.
    cfg = replace(cfg, name=f"join{port}", data_root=smoke_root, demo=None,
                  data=replace(cfg.data, spacing=(6.0, 6.0, 6.0)),
                  federation=replace(cfg.federation, rounds=3, wait_for_sites_s=6.0,
                                                     round_timeout_s=240.0, eval_every=3),
                  server=replace(cfg.server, host="127.0.0.1", port=port, certs_dir=certs))
    cfg_path = tmp_path / "fed.yaml"
    cfg_path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    nodes: list[Managed] = []

    def start_site(site: str) -> Managed:
        node = start_supernode(f"127.0.0.1:{port}", free_port(),
                               site_node_config(site, smoke_root / site / "site.yaml"),
                               tmp_path / f"{site}.log", ca_cert=certs / "ca.crt",
                               auth_key=certs / "sites" / f"{site}.key")
        nodes.append(node)
        return node

    yield cfg, cfg_path, start_site
    for node in nodes:
        node.stop()


def test_a_site_joins_after_round_one_and_trains(deployment, tmp_path: Path) -> None:
    cfg, cfg_path, start_site = deployment
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    joiner_state = cfg.data_root / "hospitalC" / "state" / cfg.name / "local_state.ckpt"
    server = _server(cfg_path, run_dir)
    try:
        start_site("hospitalA")
        start_site("hospitalB")
        _wait_for(lambda: checkpoint_path(run_dir, 1).is_file(), 240, "round 1", server)
        assert not joiner_state.exists()
        start_site("hospitalC")  # the newcomer: no state, never saw round 1
        server.wait(timeout=300)
        assert server.returncode == 0, (run_dir / "logs" / "flwr_run.log").read_text()[-3000:]
    finally:
        if server.poll() is None:
            Managed("server", server, Path("/dev/null")).kill()
    rows = read_jsonl(run_dir / "metrics.jsonl")
    trained = {(r["round"], r["site"]) for r in rows if r["phase"] == "train"}
    assert {s for r, s in trained if r == 1} == {"hospitalA", "hospitalB"}
    joined = sorted(r for r, s in trained if s == "hospitalC")
    assert joined and set(joined) <= {2, 3}, f"hospitalC trained in rounds {joined}"
    for rnd in (2, 3):
        assert {"hospitalA", "hospitalB"} <= {s for r, s in trained if r == rnd}
    assert not [r for r in rows if r["phase"] in ("rejected", "timeout")]
    # The newcomer built its restore and head at home and kept them there.
    _, local = split_keys(build_model(cfg.model), get_policy(cfg.federation.policy))
    state = load_payload(joiner_state)
    assert set(state["local"]) == set(local)
    assert state["round"] == max(joined) > 1
    # Its local part is its own: it differs from the sites that trained from round 1.
    other = load_payload(cfg.data_root / "hospitalA" / "state" / cfg.name / "local_state.ckpt")
    assert other["round"] == 3
    assert any(not state["local"][k].equal(other["local"][k]) for k in local)
    final = load_payload(run_dir / "final_shared.ckpt")
    assert final["rounds"] == 3
