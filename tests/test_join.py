"""A hospital joins a running federation: it trains from the next round with its own fresh local part.

The joiner is the demo's hospitalNew: another scanner, only T1c and FLAIR, and a class no
other site annotates (a resection cavity, RC), and it is not listed in the coordinator's
fed.yaml. Loopback deployment (TLS, site keys) as in test_federation.py: Flower's own
SuperLink and SuperNodes on 127.0.0.1, bounded timeouts.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import json

import pytest

from uharmony_fed import REGIONS
from uharmony_fed.checkpoint import checkpoint_path, load_payload
from uharmony_fed.demo import JOINER_NAME, make_demo
from uharmony_fed.fedconfig import load_config
from uharmony_fed.model import build_model
from uharmony_fed.policy import get_policy, split_keys

from loopback import Loopback, kill_tree, read_jsonl, start_server, wait_for

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("join_data")
    make_demo(root, sites=2, cases=3, seed=0, spacing_mm=6.0, log=None, joiner=True)
    return root


@pytest.fixture
def deployment(smoke_root: Path, tmp_path: Path):
    """A 3-round TLS + site-key deployment config on a free loopback port, and a site launcher."""
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    # 6 mm voxels keep each round a few seconds of CPU, even on a busy machine.
    cfg = replace(cfg, data_root=smoke_root, demo=None, sites=("hospitalA", "hospitalB"),
                  data=replace(cfg.data, spacing=(6.0, 6.0, 6.0)),
                  federation=replace(cfg.federation, rounds=3, wait_for_sites_s=6.0,
                                     round_timeout_s=240.0, eval_every=3))
    dep = Loopback(cfg, tmp_path, "join", sites=("hospitalA", "hospitalB", JOINER_NAME))
    yield dep.cfg, dep.cfg_path, dep.start_site
    dep.stop()


def test_a_site_joins_after_round_one_and_trains(deployment, tmp_path: Path) -> None:
    cfg, cfg_path, start_site = deployment
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    joiner_state = cfg.data_root / JOINER_NAME / "state" / cfg.name / "local_state.ckpt"
    server = start_server(cfg_path, run_dir)
    try:
        start_site("hospitalA")
        start_site("hospitalB")
        wait_for(lambda: checkpoint_path(run_dir, 1).is_file(), 240, "round 1", server)
        assert not joiner_state.exists()
        start_site(JOINER_NAME)  # the newcomer: no state, never saw round 1
        server.wait(timeout=300)
        assert server.returncode == 0, (run_dir / "logs" / "flwr_run.log").read_text()[-3000:]
    finally:
        if server.poll() is None:
            kill_tree(server)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    trained = {(r["round"], r["site"]) for r in rows if r["phase"] == "train"}
    assert {s for r, s in trained if r == 1} == {"hospitalA", "hospitalB"}
    joined = sorted(r for r, s in trained if s == JOINER_NAME)
    assert joined and set(joined) <= {2, 3}, f"{JOINER_NAME} trained in rounds {joined}"
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
    # Its extra class lives in its own head only, and its Dice comes back as a scalar.
    assert state["local"]["head.weight"].shape[1] == len(REGIONS) + 1
    assert other["local"]["head.weight"].shape[1] == len(REGIONS)
    evaluated = json.loads((run_dir / "final_metrics.json").read_text())
    assert "dice-RC" in evaluated[JOINER_NAME] and "dice-RC" not in evaluated["hospitalA"]
