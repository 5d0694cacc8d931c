"""Faults: processes killed mid-write or mid-round, a full disk, and bad data at one site.

The kill tests SIGKILL real processes at random moments; the round tests run Flower's own
processes (loopback TLS deployment, simulation) with short, bounded timeouts.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from uharmony_fed.checkpoint import checkpoint_path, load_latest_checkpoint, load_payload
from uharmony_fed.data import discover_cases, load_site_config
from uharmony_fed.demo import make_demo
from uharmony_fed.fed import client_app, site_runtime
from uharmony_fed.fed.launch import simulate
from uharmony_fed.fed.server_loop import check_reply, initial_shared_arrays
from uharmony_fed.fed.site_runtime import SiteRuntime
from uharmony_fed.fed.strategies import build_strategy
from uharmony_fed.fed.wire import ARRAYS, CONFIG, RoundSpec
from uharmony_fed.fedconfig import load_config

REPO = Path(__file__).resolve().parents[1]
SITES = ("hospitalA", "hospitalB", "hospitalC")

# -- killed while writing ----------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from uharmony_fed.checkpoint import load_latest_checkpoint, save_checkpoint, save_payload
    mode, target, start = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    for i in range(start, start + 10_000):
        # ~24 MB per file, each value equal to its round, so a torn file cannot pass as whole.
        payload = {"arrays": {"w": torch.full((6_000_000,), float(i))}}
        if mode == "checkpoint":
            save_checkpoint(target, i, payload)
        else:
            save_payload(target, {"round": i, **payload})
        print(i, flush=True)
""")


def _intact(payload: dict, expected_round: int) -> bool:
    w = payload["arrays"]["w"]
    return payload["round"] == expected_round and w.numel() == 6_000_000 and bool((w == expected_round).all())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["checkpoint", "site-state"])
def test_killed_mid_write_leaves_an_intact_file(mode: str, tmp_path: Path, caplog) -> None:
    """SIGKILL a writer of large files 5 times at random moments inside a write; every
    time the newest file on disk is whole, and the next writer resumes from it."""
    rng = random.Random(0)
    target = tmp_path / ("run" if mode == "checkpoint" else "local_state.ckpt")
    tmp_dir = target / "checkpoints" if mode == "checkpoint" else tmp_path
    done = 0
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, mode, str(target), str(done + 1)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        # Wait for at least one write of this process, then kill it somewhere in the next ones.
        first = proc.stdout.readline()
        assert first.strip(), "writer failed before its first write"
        time.sleep(rng.uniform(0.05, 1.0))
        # Kill while a temporary file exists: the process is inside a write for sure.
        deadline = time.monotonic() + 10
        while not list(tmp_dir.glob(".*tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.kill()
        proc.wait(timeout=10)
        latest = load_latest_checkpoint(target) if mode == "checkpoint" else load_payload(target)
        assert latest is not None
        assert latest["round"] >= int(first) and _intact(latest, latest["round"])
        done = latest["round"]
    if mode == "checkpoint":
        # A newest file damaged after the fact (truncated) is skipped with a warning.
        newest = checkpoint_path(target, done)
        newest.write_bytes(newest.read_bytes()[: 1_000_000])
        with caplog.at_level(logging.WARNING, logger="uharmony_fed.checkpoint"):
            latest = load_latest_checkpoint(target)
        assert latest is not None and _intact(latest, done - 1)
        assert "skipping damaged checkpoint" in caplog.text and newest.name in caplog.text
        # The writes left no stale temporary files behind once a writer ran again.
        assert len(list((target / "checkpoints").glob(".*tmp-*"))) <= 1


def _site_runtime(root: Path, site: str, state_dir: Path, **train) -> SiteRuntime:
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides={
        "data": {"spacing": [6.0, 6.0, 6.0]}, "train": {"amp": False, "device": "cpu", **train}})
    runtime = SiteRuntime(load_site_config(root / site / "site.yaml"), RoundSpec.from_fed(cfg, 1))
    runtime.state_path = state_dir / "local_state.ckpt"  # keep the shared demo folder read-only
    return runtime


def test_site_state_falls_back_to_last_intact_file(tiny_demo: Path, tmp_path: Path, caplog) -> None:
    runtime = _site_runtime(tiny_demo, "hospitalA", tmp_path)
    runtime.save_state(1)
    round1 = runtime.local_tensors()
    with torch.no_grad():
        for p in runtime.model.parameters():
            p.add_(1.0)
    runtime.save_state(2)
    data = runtime.state_path.read_bytes()
    runtime.state_path.write_bytes(data[: len(data) // 2])  # the newest file damaged on disk
    fresh = _site_runtime(tiny_demo, "hospitalA", tmp_path)
    with caplog.at_level(logging.WARNING, logger="uharmony_fed.fed.site_runtime"):
        state = fresh.restore_state()
    assert state.server_round == 1 and "checksum mismatch" in caplog.text
    assert set(state.local) == set(round1)
    assert all(torch.equal(fresh.local_tensors()[k], round1[k]) for k in round1)


# -- a full disk at one site ----------------------------------------------------------------------


def test_disk_full_site_replies_clear_error_and_round_goes_on(tiny_demo: Path, tmp_path: Path,
                                                             monkeypatch, caplog) -> None:
    """Three sites run the real ClientApp (with its payload-audit mod) in-process.

    hospitalB's disk is full: its state write raises ``OSError(ENOSPC)`` naming the file,
    exactly what ``open``/``write`` raise on a full disk (a real full file system needs a
    mount this test cannot make). Its ClientApp replies with one clear error that says
    "disk full" and carries no path; the site's log names the path; the server rejects
    that reply and aggregates the other two.
    """
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides={
        "data_root": str(tiny_demo), "data": {"spacing": [6.0, 6.0, 6.0]},
        "train": {"amp": False, "device": "cpu"}})
    real_save = site_runtime.save_payload

    def save(path: Path, payload: dict) -> None:
        if "hospitalB" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(path, payload)

    monkeypatch.setattr(site_runtime, "save_payload", save)
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    try:
        arrays = initial_shared_arrays(cfg)
        content = {ARRAYS: ArrayRecord(arrays), CONFIG: ConfigRecord(RoundSpec.from_fed(cfg, 1).to_record())}
        replies = []
        with caplog.at_level(logging.ERROR, logger="uharmony_fed.fed.client_app"):
            for node, site in enumerate(SITES, start=1):
                # Each site writes its state into this test's folder, not the shared demo.
                site_yaml = tmp_path / site / "site.yaml"
                site_yaml.parent.mkdir()
                conf = yaml.safe_load((tiny_demo / site / "site.yaml").read_text())
                conf.update(data_dir=str(tiny_demo / site / conf["data_dir"]),
                            state_dir=str(tmp_path / site / "state"))
                site_yaml.write_text(yaml.safe_dump(conf))
                ctx = Context(run_id=1, node_id=node, node_config={"site": site, "site-config": str(site_yaml)},
                              state=RecordDict(), run_config={})
                msg = Message(RecordDict(dict(content)), dst_node_id=node, message_type="train")
                replies.append(client_app.app(msg, ctx))
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
    reasons = [check_reply(r, arrays, cfg.federation.max_update_norm) for r in replies]
    assert reasons[0] is None and reasons[2] is None
    assert reasons[1] is not None and "site hospitalB: disk full (ENOSPC)" in reasons[1]
    assert str(tmp_path) not in reasons[1] and "<path>" in reasons[1]
    assert str(tmp_path / "hospitalB" / "state") in caplog.text  # the site's own log names the path
    agg, _ = build_strategy(cfg).aggregate_train(1, [replies[0], replies[2]])
    assert agg is not None and set(agg.keys()) == set(arrays)


# -- bad data at a site, in a real simulation -----------------------------------------------------


@pytest.mark.slow
def test_bad_case_skip_and_fail_in_simulation(tmp_path: Path) -> None:
    """hospitalA (policy skip) and hospitalB (policy fail) each get one unreadable label file.

    A trains without it and reports ``skipped-cases`` 1; B's rounds fail with an error
    reply that names the problem and the fix; the rounds complete with A and C.
    """
    root = tmp_path / "data"
    make_demo(root, sites=3, cases=4, seed=0, spacing_mm=6.0, log=None)
    for site, policy in (("hospitalA", "skip"), ("hospitalB", "fail")):
        site_yaml = root / site / "site.yaml"
        case = discover_cases(load_site_config(site_yaml))[0]
        assert case.label is not None
        case.label.write_bytes(b"this is not a NIfTI file")
        conf = yaml.safe_load(site_yaml.read_text())
        conf["bad_case_policy"] = policy
        site_yaml.write_text(yaml.safe_dump(conf))
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides={
        "data": {"spacing": [6.0, 6.0, 6.0]}, "train": {"amp": False, "device": "cpu"},
        "federation": {"rounds": 2, "round_timeout_s": 120.0}})
    cfg = replace(cfg, data_root=root, demo=None)
    result = simulate(cfg, tmp_path / "run", echo=False, timeout=300)
    log = (result.run_dir / "logs" / "flwr_run.log").read_text(errors="replace")
    assert result.returncode == 0, log[-3000:]
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    for rnd in (1, 2):
        trained = {r["site"]: r for r in rows if r["round"] == rnd and r["phase"] == "train"}
        assert set(trained) == {"hospitalA", "hospitalC"}
        assert trained["hospitalA"]["skipped-cases"] == 1 and trained["hospitalC"]["skipped-cases"] == 0
        rejected = [r for r in rows if r["round"] == rnd and r["phase"] == "rejected"]
        assert len(rejected) == 1 and "site hospitalB: DataError" in rejected[0]["reason"]
        assert "bad_case_policy: skip" in rejected[0]["reason"]
    assert checkpoint_path(result.run_dir, 2).is_file()
    assert "update rejected: error reply: site hospitalB" in log


# -- a site killed mid-training on a TLS loopback deployment --------------------------------------


@pytest.mark.slow
def test_site_killed_mid_training_rejoins_and_resumes(tmp_path: Path) -> None:
    from test_federation import shared_and_local

    from loopback import Loopback, kill_tree, read_jsonl, start_server, wait_for

    root = tmp_path / "data"
    make_demo(root, sites=3, cases=3, seed=0, spacing_mm=6.0, log=None)
    # Two sites keep it small on a shared 2-core machine; the round deadline must cover a
    # ClientApp's start-up (torch, MONAI, data) under load, and the dead site costs one deadline.
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides={
        "sites": ["hospitalA", "hospitalC"],
        "data": {"spacing": [6.0, 6.0, 6.0]},
        "train": {"amp": False, "device": "cpu", "local_steps": 10},
        "federation": {"rounds": 3, "min_sites": 1, "wait_for_sites_s": 10.0, "round_timeout_s": 90.0,
                       "eval_every": 10}})
    dep = Loopback(replace(cfg, data_root=root, demo=None), tmp_path, "kill")
    cfg, cfg_path, start = dep.cfg, dep.cfg_path, dep.start_site
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    state_c = root / "hospitalC" / "state" / cfg.name / "local_state.ckpt"
    server = start_server(cfg_path, run_dir)
    try:
        start("hospitalA")
        victim = start("hospitalC")
        wait_for(lambda: checkpoint_path(run_dir, 1).is_file(), 240, "round 1", server)
        assert load_payload(state_c)["round"] == 1
        log_c = tmp_path / "hospitalC.log"
        wait_for(lambda: log_c.read_text(errors="replace").count("Receiving: train") >= 2, 60,
                  "hospitalC to receive round 2", server)
        time.sleep(2.0)  # inside its round-2 ClientApp (starting up or training), before it saves
        victim.kill()
        assert load_payload(state_c)["round"] == 1, "the kill came after round 2 was saved"
        # The same site key, a new process. SuperLink refuses to activate it while the dead
        # node's heartbeat has not expired yet; like `uharmony-fed client`, try again.
        restarts = [start("hospitalC")]
        deadline = time.monotonic() + 420
        while server.poll() is None and time.monotonic() < deadline:
            if restarts[-1].proc.poll() is not None:
                time.sleep(2.0)
                restarts.append(start("hospitalC"))
            time.sleep(0.5)
        assert server.wait(timeout=10) == 0
    finally:
        if server.poll() is None:
            kill_tree(server)
        dep.stop()
    rows = read_jsonl(run_dir / "metrics.jsonl")
    trained = {r: {x["site"] for x in rows if x["round"] == r and x["phase"] == "train"} for r in (1, 2, 3)}
    assert trained[1] == {"hospitalA", "hospitalC"}
    assert trained[2] == {"hospitalA"}  # the round went on without the dead site
    assert "hospitalC" in trained[3]  # ... which rejoined the next round
    state = load_payload(state_c)
    _, local = shared_and_local(cfg)
    assert state["round"] == 3 and set(state["local"]) == local
    # No private key was written into the run folder or the logs.
    for path in [*run_dir.rglob("*"), *tmp_path.glob("*.log")]:
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_a_joining_site_warms_up_its_local_part_on_the_frozen_shared_model(tiny_demo: Path, tmp_path: Path) -> None:
    """train.join_warmup_rounds: a site new to a running federation leaves the shared arrays as received."""
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides={
        "data": {"spacing": [6.0, 6.0, 6.0]},
        "train": {"amp": False, "device": "cpu", "local_steps": 2, "join_warmup_rounds": 1}})
    for server_round, warms in ((1, False), (3, True)):  # founding site in round 1; a joiner in round 3
        runtime = SiteRuntime(load_site_config(tiny_demo / "hospitalA" / "site.yaml"), RoundSpec.from_fed(cfg, 1))
        runtime.state_path = tmp_path / f"r{server_round}" / "local_state.ckpt"
        shared, local = runtime.shared_tensors(), runtime.local_tensors()
        runtime.train_round(RoundSpec.from_fed(cfg, server_round))
        same_shared = all(torch.equal(shared[k], v) for k, v in runtime.shared_tensors().items())
        assert same_shared is warms
        assert any(not torch.equal(local[k], v) for k, v in runtime.local_tensors().items())
        if warms:  # the next round trains everything
            runtime.train_round(RoundSpec.from_fed(cfg, server_round + 1))
            assert any(not torch.equal(shared[k], v) for k, v in runtime.shared_tensors().items())
            assert all(p.requires_grad for p in runtime.model.parameters())
