"""The federation for real: Flower's simulation engine and a TLS loopback deployment.

These tests start Flower's own processes (SuperLink, SuperNodes, ``flwr run``) on
127.0.0.1 with bounded timeouts, and inspect what each site actually sent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from flwr.app import ArrayRecord

from uharmony_fed.checkpoint import checkpoint_path, load_payload
from uharmony_fed.data import discover_cases, load_site_config
from uharmony_fed.demo import make_demo
from uharmony_fed.fed.audit import arrays_digest
from uharmony_fed.fed.launch import simulate
from uharmony_fed.fed.runtime import free_port
from uharmony_fed.fedconfig import FedConfig, load_config
from uharmony_fed.model import build_model
from uharmony_fed.policy import get_policy, split_keys

from loopback import SITES, Loopback, kill_tree, read_jsonl, start_server, wait_for

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


CASE_IDS: list[str] = []


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("smoke_data")
    make_demo(root, sites=3, cases=3, seed=0, log=None)
    for site in SITES:
        CASE_IDS.extend(c.case_id for c in discover_cases(load_site_config(root / site / "site.yaml")))
    assert len(CASE_IDS) == 9
    return root


def smoke_config(root: Path, **federation) -> FedConfig:
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    return replace(cfg, data_root=root, demo=None,
                   federation=replace(cfg.federation, **federation))


def shared_and_local(cfg: FedConfig) -> tuple[set[str], set[str]]:
    shared, local = split_keys(build_model(cfg.model), get_policy(cfg.federation.policy))
    return set(shared), set(local)


def assert_payload_clean(rows: list[dict], shared: set[str], local: set[str]) -> None:
    """Every reply holds exactly the shared keys, numbers and the site name; nothing else."""
    assert rows, "the site sent nothing"
    for row in rows:
        out = row["out"]
        assert set(out["arrays"]) <= {"arrays"}
        if row["in"]["type"] == "train":
            keys = set(out["arrays"]["arrays"]["keys"])
            assert keys == shared
            assert not keys & local
        else:
            assert out["arrays"] == {}, "evaluation replies carry no arrays"
        for value in out["metrics"]["metrics"].values():
            assert isinstance(value, (int, float)) and not isinstance(value, bool)
        assert set(out["configs"]) == {"site"}
        assert set(out["configs"]["site"]) == {"name"}
        assert out["configs"]["site"]["name"] in SITES
        text = json.dumps(out)
        for forbidden in ("/", "\\\\", ".nii", ".gz", "data_dir", "state_dir", *CASE_IDS):
            assert forbidden not in text, f"{forbidden!r} left the site: {text[:300]}"


def test_simulation_trains_and_sends_only_shared_arrays(smoke_root: Path, tmp_path: Path) -> None:
    cfg = smoke_config(smoke_root)
    audit = tmp_path / "audit"
    result = simulate(cfg, tmp_path / "run", audit_dir=audit, echo=False, timeout=400)
    assert result.returncode == 0, (result.run_dir / "logs" / "flwr_run.log").read_text()[-3000:]
    run = result.run_dir
    assert checkpoint_path(run, 2).is_file()
    final = json.loads((run / "final_metrics.json").read_text())
    assert set(final) == set(SITES)
    assert "dice-ET" not in final["hospitalC"] and "dice-WT" in final["hospitalC"]  # WT-only site
    assert {"dice-ET", "dice-TC", "dice-WT"} <= set(final["hospitalA"])
    rows = read_jsonl(run / "metrics.jsonl")
    assert {r["round"] for r in rows if r["phase"] == "train"} == {1, 2}
    shared, local = shared_and_local(cfg)
    logs = sorted(audit.glob("audit-*.jsonl"))
    assert len(logs) == 3
    for log in logs:
        assert_payload_clean(read_jsonl(log), shared, local)
    # Every site kept its own local part at home, for every local key.
    for site in SITES:
        state = load_payload(smoke_root / site / "state" / cfg.name / "local_state.ckpt")
        assert set(state["local"]) == local and state["round"] == 2
    # The server never saw a local key.
    ckpt = load_payload(checkpoint_path(run, 2))
    assert set(ckpt["arrays"]) == shared


# -- loopback deployment: TLS, site keys, k-of-n, resume ------------------------------------------


@pytest.fixture
def deployment(smoke_root: Path, tmp_path: Path):
    """A TLS + site-key deployment config on a free loopback port, and a site launcher."""
    dep = Loopback(smoke_config(smoke_root, wait_for_sites_s=6.0, round_timeout_s=240.0), tmp_path,
                   "deploy", audit=True)
    yield dep.cfg, dep.cfg_path, dep.start_site
    dep.stop()


def test_tls_deployment_runs_with_two_of_three_sites_and_resumes(deployment, tmp_path: Path) -> None:
    cfg, cfg_path, start_site = deployment
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    server = start_server(cfg_path, run_dir)
    try:
        # hospitalC never connects: the round must start after the deadline with two sites.
        start_site("hospitalA")
        start_site("hospitalB")
        wait_for(lambda: checkpoint_path(run_dir, 1).is_file(), 240, "round 1", server)
        kill_tree(server)  # the coordinator dies after round 1
        ckpt1 = load_payload(checkpoint_path(run_dir, 1))
        server = start_server(cfg_path, run_dir, "--resume")
        server.wait(timeout=300)
        assert server.returncode == 0
    finally:
        if server.poll() is None:
            kill_tree(server)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    trained = {(r["round"], r["site"]) for r in rows if r["phase"] == "train"}
    assert {s for r, s in trained if r == 2} == {"hospitalA", "hospitalB"}
    assert checkpoint_path(run_dir, 2).is_file()
    # Round 2 started from the arrays checkpointed after round 1, not from scratch.
    expected = arrays_digest(ArrayRecord({k: v.float() for k, v in ckpt1["arrays"].items()}))
    audit = read_jsonl(tmp_path / "audit-hospitalA.jsonl")
    round2 = [r for r in audit if r["in"]["type"] == "train"
              and r["in"]["configs"]["config"]["server-round"] == 2]
    assert round2 and round2[-1]["in"]["arrays"]["arrays"]["digest"] == expected
    shared, local = shared_and_local(cfg)
    assert_payload_clean(audit, shared, local)
    # Each site's local part survived the server's restart.
    state = load_payload(cfg.data_root / "hospitalA" / "state" / cfg.name / "local_state.ckpt")
    assert state["round"] == 2 and set(state["local"]) == local
    assert not any(p.info["name"] == "flower-superlink" and str(cfg.server.port) in " ".join(p.info["cmdline"] or [])
                   for p in psutil.process_iter(["name", "cmdline"]))


def test_sigterm_to_a_site_stops_its_supernode(smoke_root: Path, tmp_path: Path) -> None:
    """systemd stops a site with SIGTERM: its SuperNode must go with it, not be orphaned."""
    import signal

    cmd = [sys.executable, "-m", "uharmony_fed.cli", "client", "--site", "hospitalA", "--insecure",
           "--site-config", str(smoke_root / "hospitalA" / "site.yaml"),
           "--server", f"127.0.0.1:{free_port()}"]  # nobody listens: the SuperNode keeps retrying
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def supernodes() -> list[psutil.Process]:
            try:
                return [c for c in psutil.Process(proc.pid).children(recursive=True)
                        if "flower-supernode" in " ".join(c.cmdline())]
            except psutil.NoSuchProcess:
                return []

        wait_for(lambda: bool(supernodes()), 60, "the SuperNode to start")
        children = supernodes()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"orphaned SuperNode(s): {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
